"""``hvd.elastic``: Horovod's elastic training API on meshrun's restarts.

A mesh does not grow or shrink in place: ``meshrun -n N --max-restarts K``
(or ``torchrun --max-restarts K``) starts every rank again after a failure,
at the same N. ``@hvd.elastic.run`` makes such a try resume where the last
``state.commit()`` left it: ``commit()`` keeps the state in memory, as
Horovod's, and rank 0 also writes it to a file of the job's that outlives
its tries (``commit_file()``: written whole, then renamed over the last
one); the next try's rank 0 reads it back before ``func`` runs and
broadcasts it, so every rank restores it wherever it runs (no shared disk),
every rank calls the reset callbacks, and ``sync()`` gives every rank rank
0's state. A try whose rank 0 runs on another node than the one holding the
commits fails on every rank, saying so (each host's job folder keeps which
job's rank 0 wrote them); torchrun's run id without --rdzv-id is refused.
A failure inside a try (a peer lost: ``HorovodInternalError``, meshrun's
``MeshError``) ends the process, and the launcher starts the next try.
The file holds the models' and optimizers' ``state_dict()`` (``torch.save``,
read back with ``weights_only=True``) and the plain values in msgpack
(never pickled). Without restarts (a plain run) nothing is written.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
import random
import secrets
import socket
import stat
from typing import Any, Callable, Iterator, Sequence, TypeVar

import msgpack
import torch

from mesh.rdvlaunch import job_folder

from ..mpi_compat.tuples import unwrap, wrap
from . import basics
from .basics import HorovodInternalError
from .functions import (allgather_object, broadcast_object, broadcast_optimizer_state,
                        broadcast_parameters)

__all__ = ["run", "State", "ObjectState", "TorchState", "ElasticSampler",
           "HorovodInternalError", "HostsUpdatedInterrupt", "commit_file", "restart_count"]

_FORMAT = "meshrun hvd.elastic 1"
_JOB = "hvd-elastic.job"       # every node's word of the job's rank 0 and its folder
F = TypeVar("F", bound=Callable[..., Any])


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's: raised to start ``func`` again at the last sync point
    (``skip_sync``: without syncing first). meshrun never raises it (its
    hosts do not change in place: ``check_host_updates`` does nothing); a
    script's own raise of it is honoured as Horovod's."""

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__("hosts updated" + (" (skip sync)" if skip_sync else ""))
        self.skip_sync = skip_sync


def _env_int(*names: str) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def restart_count() -> int:
    """This try's number: 0 first, then one more at each restart
    (TORCHELASTIC_RESTART_COUNT, MESH_RESTART_COUNT)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", "MESH_RESTART_COUNT")


def commit_file() -> str | None:
    """Where rank 0 writes each commit: ``<tmp>/meshrun-job-<uid>-<run id>/
    hvd-elastic.pt``, the job's TORCHELASTIC_RUN_ID (the same in every try);
    None without restarts to come (TORCHELASTIC_MAX_RESTARTS 0 or unset).
    torchrun's run id without ``--rdzv-id``, ``none``, is refused: every
    such job of the user's would share (and clear) one folder."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or _env_int("TORCHELASTIC_MAX_RESTARTS") <= 0:
        return None
    if run_id == "none":
        raise ValueError("hvd.elastic: TORCHELASTIC_RUN_ID is 'none', torchrun's without "
                         "--rdzv-id: every such job would keep its commits in one folder "
                         "and clear the others'; give torchrun --rdzv-id <this job's name> "
                         "(or --standalone on one host), or run under meshrun")
    return os.path.join(job_folder(run_id), "hvd-elastic.pt")


def _own_folder(path: str) -> None:
    """Make ``path`` (mode 0700), or check that the one there is this user's
    own folder, not a link another user left in a shared /tmp."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"hvd.elastic: {path} is not a folder of this user's: "
                                  f"remove it (the job's commits are kept there)") from None


class State:
    """Horovod's ``hvd.elastic.State``: what ``run`` keeps across tries."""

    def __init__(self) -> None:
        self._reset_callbacks: list[Callable[[], Any]] = []
        self._commits = 0

    def register_reset_callbacks(self, callbacks: Sequence[Callable[[], Any]]) -> None:
        """Callbacks called on every rank as a try after a restart starts
        (after the last commit is restored, before the sync), as Horovod
        calls them after a reset."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Keep the state: in memory (``save()``) and, on rank 0 of a job
        with restarts to come, in ``commit_file()`` for the next try."""
        self.save()
        self._commits += 1
        path = commit_file()
        if path is not None and basics.rank() == 0:
            _own_folder(os.path.dirname(path))
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save({"format": _FORMAT, "commits": self._commits, **self._kept()}, tmp)
            os.replace(tmp, path)       # (a rank killed while writing leaves the last whole one)
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Horovod's: raises HostsUpdatedInterrupt when hosts were added or
        removed. A mesh's hosts do not change in place: nothing to check."""

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Called before the reset callbacks (Horovod's)."""

    def _kept(self) -> dict[str, Any]:
        """What ``save()`` kept, as the commit file holds it."""
        raise NotImplementedError

    def _take(self, kept: dict[str, Any]) -> None:
        """``_kept()``'s values, read back, as what ``save()`` kept."""
        raise NotImplementedError

    def _resume(self, commit: bytes) -> None:
        """The last commit's state (the file's bytes, rank 0's), restored."""
        kept = torch.load(io.BytesIO(commit), weights_only=True)
        if not isinstance(kept, dict) or kept.get("format") != _FORMAT:
            raise ValueError(f"hvd.elastic: {commit_file()} on rank 0 is not a commit of "
                             f"hvd.elastic's: remove it")
        self._commits = int(kept["commits"])
        self._take(kept)
        self.restore()


def _read_job(folder: str) -> dict[str, str] | None:
    """This node's word of the job's rank 0 (``_JOB`` in its job folder)."""
    try:
        with open(os.path.join(folder, _JOB)) as f:
            job = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return job if isinstance(job, dict) and isinstance(job.get("token"), str) else None


def _write_whole(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _join_try(state: State, path: str) -> None:
    """A try's start, on every rank (collective): rank 0 reads the last
    commit on its host (in the first try it removes an earlier job's and
    names this job anew: a random token, its host and folder) and
    broadcasts it with that name, so every rank restores it wherever it
    runs (no shared disk); every rank keeps the name in its own host's job
    folder. Where a rank's host kept another name, or rank 0's kept the
    name of a rank 0 elsewhere, every rank fails, saying so: rank 0 runs on
    another host than the one that holds the commits."""
    folder = os.path.dirname(path)
    restart = restart_count()
    host = socket.gethostname()
    word: dict[str, Any] = {}
    if basics.rank() == 0:
        _own_folder(folder)
        job = _read_job(folder) if restart > 0 else None
        commit = None
        if job is not None and (job.get("host"), job.get("folder")) != (host, folder):
            word = {"job": {"token": ""}, "commit": None, "elsewhere": job}
        elif job is not None:
            try:
                with open(path, "rb") as f:
                    commit = f.read()
            except FileNotFoundError:
                pass                # (the job failed before its first commit)
        else:                       # (an earlier job's, with the same run id: not this one's)
            for stale in (path, os.path.join(folder, _JOB)):
                try:
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
            job = {"token": secrets.token_hex(8), "host": host, "folder": folder}
        word = word or {"job": job, "commit": commit, "elsewhere": None}
    word = broadcast_object(word)
    job, commit = word["job"], word["commit"]
    mine = _read_job(folder) if restart > 0 else None
    other = mine is not None and mine["token"] != job["token"]
    kept = allgather_object([host, folder, mine if other else None])
    moved = [(r, h, f, m) for r, (h, f, m) in enumerate(kept) if m is not None]
    if word["elsewhere"] is not None or moved:
        r, h, f, m = moved[0] if moved else (0, *kept[0][:2], word["elsewhere"])
        raise RuntimeError(
            f"hvd.elastic: rank {basics.rank()}: try {restart} (TORCHELASTIC_RESTART_COUNT="
            f"{restart}): rank 0 runs on host {kept[0][0]}, whose job folder {kept[0][1]} "
            f"holds none of this job's commits, but rank {r} on host {h} ({f}) kept word "
            f"that the job's rank 0 wrote them on host {m.get('host')} in {m.get('folder')}: "
            f"the node of rank 0 changed between tries. Run rank 0 on that host again "
            f"(meshrun: --node-rank 0 there; torchrun's rendezvous may give node rank 0 to "
            f"another node in a try) or give every node's ranks one shared folder as TMPDIR")
    _own_folder(folder)
    _write_whole(os.path.join(folder, _JOB), json.dumps(job).encode())
    if commit is not None:
        state._resume(commit)


class ObjectState(State):
    """Horovod's ``ObjectState``: each keyword an attribute, saved, restored
    and synced (rank 0's by ``broadcast_object``). Plain values only
    (numbers, strings, lists, dicts, tuples...): msgpack, never pickled."""

    def __init__(self, bcast_object: Callable[[Any], Any] | None = None,
                 get_rank: Callable[[], int] | None = None, **kwargs: Any) -> None:
        self._bcast_object = bcast_object or broadcast_object
        self._saved_state = kwargs
        self._set_attrs()
        super().__init__()

    def save(self) -> None:
        self._saved_state = {attr: getattr(self, attr) for attr in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for attr, value in self._saved_state.items():
            setattr(self, attr, value)

    def _kept(self) -> dict[str, Any]:
        try:
            return {"objects": msgpack.packb(wrap(self._saved_state), use_bin_type=True)}
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"hvd.elastic: state.commit() on rank 0: the state's values "
                            f"{sorted(self._saved_state)} are written in msgpack (meshrun never "
                            f"pickles): {e}; keep tensors in a model or an optimizer given "
                            f"to TorchState") from None

    def _take(self, kept: dict[str, Any]) -> None:
        self._saved_state = unwrap(msgpack.unpackb(kept["objects"], raw=False,
                                                   strict_map_key=False))


class _Handler:
    """Horovod's StateHandler: one model, optimizer or sampler of a TorchState."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.saved: Any = None
        self.save()

    def save(self) -> None:
        self.saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self.saved)

    def sync(self) -> None:
        raise NotImplementedError

    def set_value(self, value: Any) -> None:
        self.value = value
        self.save()


class _Model(_Handler):
    def sync(self) -> None:
        broadcast_parameters(self.value.state_dict(), root_rank=0)


class _Optimizer(_Handler):
    def sync(self) -> None:
        broadcast_optimizer_state(self.value, root_rank=0)


class _Sampler(_Handler):
    def sync(self) -> None:
        self.value.load_state_dict(broadcast_object(self.value.state_dict()))


class TorchState(ObjectState):
    """Horovod's ``TorchState(model, optimizer, **kwargs)``: models
    (``nn.Module``), optimizers and ``ElasticSampler``s by their
    ``state_dict()``, the other keywords as ObjectState's; each an
    attribute (``state.model``, ``state.epoch``)."""

    _handlers: dict[str, _Handler]

    def __init__(self, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        kwargs.update(model=model, optimizer=optimizer)
        handlers: dict[str, _Handler] = {}
        plain: dict[str, Any] = {}
        for name, value in kwargs.items():
            kind = (_Model if isinstance(value, torch.nn.Module) else
                    _Optimizer if isinstance(value, torch.optim.Optimizer) else
                    _Sampler if isinstance(value, ElasticSampler) else None)
            if kind is None:
                plain[name] = value
            else:
                handlers[name] = kind(value)
        object.__setattr__(self, "_handlers", handlers)
        for name, handler in handlers.items():
            setattr(self, name, handler.value)
        super().__init__(**plain)

    def save(self) -> None:
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self) -> None:
        for handler in self._handlers.values():
            handler.sync()
        super().sync()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._handlers and hasattr(self, name):
            self._handlers[name].set_value(value)
        super().__setattr__(name, value)

    def _kept(self) -> dict[str, Any]:
        return {**super()._kept(),
                "handlers": {name: h.saved for name, h in self._handlers.items()}}

    def _take(self, kept: dict[str, Any]) -> None:
        super()._take(kept)
        saved = kept.get("handlers", {})
        missing = sorted(set(self._handlers) - set(saved))
        if missing:
            raise ValueError(f"hvd.elastic: the last commit has no {missing}: this TorchState's "
                             f"models, optimizers and samplers are {sorted(self._handlers)}")
        for name, handler in self._handlers.items():
            handler.saved = saved[name]


def run(func: F) -> F:
    """Horovod's ``@hvd.elastic.run``: ``func(state, ...)`` after the
    state is synced (rank 0's on every rank). In a try after a restart,
    rank 0 first restores the last commit (``commit_file()``) and every
    rank calls the reset callbacks; so the training goes on from it. A
    failure ends the process (meshrun, torchrun start the next try)."""
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(state, State):
            raise TypeError(f"hvd.elastic.run: {getattr(func, '__name__', func)}'s first "
                            f"argument is a hvd.elastic state (TorchState, ObjectState), "
                            f"not {type(state).__name__}")
        path = commit_file()
        if path is not None:
            _join_try(state, path)
        if restart_count() > 0:
            state.on_reset()
        skip_sync = False
        while True:
            try:
                if not skip_sync:
                    state.sync()
                return func(state, *args, **kwargs)
            except HostsUpdatedInterrupt as e:
                skip_sync = e.skip_sync
                state.on_reset()
    return wrapper  # type: ignore[return-value]


class ElasticSampler(torch.utils.data.Sampler):  # type: ignore[type-arg]
    """Horovod's ``ElasticSampler(dataset, shuffle=True, seed=0)``: this
    rank's share of the samples not yet processed this epoch (the order
    shuffled by ``seed + epoch``, the same on every rank); ``record_batch``
    counts what the ranks processed, ``set_epoch`` starts the next epoch.
    In a TorchState its count is committed, so a try after a restart goes
    on with the samples after the last commit."""

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.processed_num = 0
        self.num_replicas = 0
        self.rank = 0
        self.remaining_indices: list[int] = []
        self.indices: list[int] = []
        self.num_samples = 0
        self.total_size = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """The next epoch (call it at an epoch's end): nothing processed yet."""
        self.epoch = epoch
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """One batch of ``batch_size`` processed on every rank."""
        self.processed_num += batch_size * self.num_replicas

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = int(state_dict["epoch"])
        self.processed_num = int(state_dict["processed_num"])
        self.reset()

    def reset(self) -> None:
        self.num_replicas = basics.size()
        self.rank = basics.rank()
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        self.remaining_indices = order[self.processed_num:]
        self.num_samples = math.ceil(len(self.remaining_indices) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        indices = self.remaining_indices[:]
        indices += indices[:self.total_size - len(indices)]    # evenly divisible
        self.indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples
