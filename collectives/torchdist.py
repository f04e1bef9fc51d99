"""A torch.distributed backend named "meshrun": unchanged torch code
(``dist.init_process_group("meshrun")``, DDP, new_group...) on a mesh.

    import collectives.torchdist          # registers "meshrun" (idempotent)
    dist.init_process_group("meshrun")    # under meshrun, torchrun, mesh.spawn

Where the mesh comes from (the default group's; new_group's are its groups):

    the process has one open (mesh.spawn's world, the script's mesh.init())
                                   -> that one, left open by destroy_process_group
    otherwise (torchrun, tcp://, file://, env:// set by hand)
                                   -> a new mesh: rank 0 serves the rendezvous on
                                      port 0 and publishes it in torch's store
                                      (as mesh.init does in torchrun's agent
                                      store); closed by destroy_process_group

Under meshrun (and inside mesh.spawn) MASTER_PORT is meshrun's own
rendezvous, where torch's env:// would start its TCPStore; so importing
this module wraps torch's env:// handler: there, the store is a TCPStore
rank 0 starts on port 0 and announces over the process's mesh (made with
mesh.init() if the script has none, and then closed as init_process_group
returns unless the group is meshrun's: a gloo group keeps no mesh). So
it is under mpirun and srun where nothing set RANK and WORLD_SIZE (torch's
env:// wants them; mesh.init() reads those launchers' own variables).
Elsewhere env:// is torch's own, but for any backend a client of rank 0's
store (env://, tcp://) whose connection closes while it connects connects
again (_c10d_store).

torch's ``dist.monitored_barrier`` refuses every backend not named
"gloo" before it calls one; registering puts ``monitored_barrier`` (this
module's) in its place, which calls meshrun's groups and hands every other
backend to torch's own. It also wraps torch's ``_object_to_tensor``, so
that an object one rank cannot pickle fails an object collective on a
meshrun group on every member (_object_to_tensor below), and torch's
``_coalescing_manager``, so that a block with no call in it on one rank
fails the others' coalesced call (_coalescing_manager below), and torch's
``_unregister_all_process_groups``, so that ``destroy_process_group()``
leaves the names ``keep_registered`` gave (below) to torch's functional
collectives.

The ``torch.backends`` entry point (``autoload``) registers the backend
when torch is imported; it never raises. That import may be the first
line of any collectives.torch* module, half made while it runs, so this
module imports none of them as it loads: ProcessGroupMeshrun
(collectives.torchpg, which imports the others) on first use (``_pg``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
import warnings
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterator


def autoload() -> None:
    """The ``torch.backends`` entry point: register, and never make
    ``import torch`` fail. Defined before ``import torch`` below: where this
    module is imported before torch, that line imports torch, whose entry
    point finds this module half loaded; it then does nothing here, and the
    module registers when its import ends (``register()`` at the bottom)."""
    if "register" not in globals():
        return
    try:
        if dist.is_available():
            register()
    except Exception as e:  # noqa: BLE001 - import torch must survive anything here
        warnings.warn(f"meshrun: could not register the torch.distributed backend: {e}",
                      stacklevel=2)


import torch  # noqa: E402 - after autoload, which torch's import may call (see there)
import torch.distributed as dist  # noqa: E402

import mesh
from mesh import env, world as _world
from mesh.peer import config_float

from . import api as C

if TYPE_CHECKING:
    from .torchpg import ProcessGroupMeshrun

__all__ = ["BACKEND", "register", "autoload", "comm_of", "ProcessGroupMeshrun",
           "monitored_barrier", "keep_registered"]

BACKEND = "meshrun"
_lock = threading.Lock()
_registered = False
_torch_env: Any = None
_torch_store: Any = None       # torch's rendezvous._create_c10d_store (env://, tcp://)
_torch_monitored: Any = None   # torch's dist.monitored_barrier, which refuses all but gloo
_torch_pickle: Any = None      # torch's c10d._object_to_tensor (the object collectives')
_torch_coalescing: Any = None  # torch's c10d._coalescing_manager
_torch_unregister_all: Any = None  # torch's c10d._unregister_all_process_groups
_kept: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
"""keep_registered's groups by name, held weakly (as torch's registry holds them)."""
_owned: Any = None          # the mesh this module made (closed with the default group)
_default: Any = None        # the default group's mesh


def _pg() -> type[ProcessGroupMeshrun]:
    """ProcessGroupMeshrun, imported on first use (see the module's doc)."""
    from .torchpg import ProcessGroupMeshrun
    return ProcessGroupMeshrun


def __getattr__(name: str) -> Any:
    """``collectives.torchdist.ProcessGroupMeshrun`` (in __all__), by ``_pg``."""
    if name == "ProcessGroupMeshrun":
        return _pg()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the "meshrun" backend with torch.distributed (and wrap
    env:// for meshrun's jobs); calling it again does nothing."""
    global _registered, _torch_env, _torch_monitored, _torch_store, _torch_pickle
    global _torch_coalescing, _torch_unregister_all
    with _lock:
        if _registered:
            return
        dist.Backend.register_backend(BACKEND, _create, extended_api=True,
                                      devices=["cpu", "cuda"])
        rdv = importlib.import_module("torch.distributed.rendezvous")
        handlers = rdv._rendezvous_handlers
        if getattr(handlers.get("env"), "__module__", None) != __name__:
            _torch_env = handlers.get("env")
            handlers["env"] = _env_handler
        _torch_store = _put((rdv,), "_create_c10d_store", _c10d_store) or _torch_store
        c10d = importlib.import_module("torch.distributed.distributed_c10d")
        _torch_pickle = _put((c10d,), "_object_to_tensor", _object_to_tensor) or _torch_pickle
        _torch_coalescing = _put((c10d, dist), "_coalescing_manager",
                                 _coalescing_manager) or _torch_coalescing
        _torch_monitored = _put((c10d, dist), "monitored_barrier",
                                monitored_barrier) or _torch_monitored
        _torch_unregister_all = _put((c10d,), "_unregister_all_process_groups",
                                     _unregister_all) or _torch_unregister_all
        _registered = True


def _put(where: tuple, name: str, ours: Any) -> Any:
    """``ours`` in place of torch's ``name`` in ``where[0]``, and in each
    other module of ``where`` that re-exports it (env:// stores, object
    pickling, the coalescing manager, monitored_barrier); torch's own, or
    None where it has none or ours is there already."""
    theirs = getattr(where[0], name, None)
    if theirs is None or getattr(theirs, "__module__", None) == __name__:
        return None
    for module in where:
        if getattr(module, name, None) is theirs:
            setattr(module, name, ours)
    return theirs


def keep_registered(name: str, pg: Any) -> None:
    """Register ``pg`` with torch's c10d under ``name`` (where torch's
    functional collectives, and the graphs torch.compile makes of them, look
    a group up by its name) for as long as ``pg`` lives, not only until the
    next ``destroy_process_group()``: torch's drops every name then, and the
    wrapper put in place of torch's ``_unregister_all_process_groups``
    registers these again. For a group over a mesh of the user's, which
    torch's teardown leaves open (engine.parallelize's tp groups)."""
    c10d: Any = dist.distributed_c10d
    c10d._register_process_group(name, pg)
    _kept[name] = pg


def _unregister_all() -> None:
    """torch's ``_unregister_all_process_groups`` (destroy_process_group of
    the default group, _abort_process_group), then keep_registered's names
    registered again."""
    _torch_unregister_all()
    c10d: Any = dist.distributed_c10d
    for name, pg in list(_kept.items()):
        c10d._register_process_group(name, pg)


def monitored_barrier(group: Any = None, timeout: Any = None,
                      wait_all_ranks: bool = False) -> None:
    """``dist.monitored_barrier`` once this module is imported: torch's own
    for every group but those whose CPU backend is meshrun's (backend
    "meshrun", "cpu:meshrun", "cpu:meshrun,cuda:nccl"), which it calls as
    torch's calls gloo's (torch's raises ValueError for any backend not
    named "gloo", a check of the name alone). Rank 0 raises naming the
    ranks that did not come within ``timeout``, the others saying rank 0
    did not release them (gloo's words; ProcessGroupMeshrun.monitored_barrier)."""
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    if c10d._rank_not_in_group(group) or not _on_meshrun(group):
        return _torch_monitored(group, timeout, wait_all_ranks)
    if timeout is None:
        timeout = c10d._get_default_timeout(BACKEND)
    elif not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    c10d._check_valid_timeout(timeout)
    pg = c10d._get_default_group() if group is None else group
    return pg._get_backend(torch.device("cpu")).monitored_barrier(
        timeout, wait_all_ranks=wait_all_ranks)


def _on_meshrun(group: Any) -> bool:
    """Whether ``group`` (None: the default one) takes CPU tensors on meshrun:
    backend "meshrun", and "cpu:meshrun" or "cpu:meshrun,cuda:nccl", which
    torch names by the whole string."""
    try:
        pg = dist.distributed_c10d._get_default_group() if group is None else group
        return isinstance(pg._get_backend(torch.device("cpu")), _pg())
    except (RuntimeError, ValueError):      # no default group; no CPU backend in it
        return False


@contextlib.contextmanager
def _coalescing_manager(group: Any = None, device: Any = None,
                        async_ops: bool = False) -> Iterator[Any]:
    """torch's ``dist._coalescing_manager`` once this module is imported. A
    block that made no call torch records (no all_reduce,
    all_gather_into_tensor or reduce_scatter_tensor in it) on a meshrun
    group calls no backend at all in torch's: that rank went on while the
    others' coalesced call waited for it, and its next call met theirs,
    which took its tensor in, silently. Here such a block makes the group's
    small agreement (ProcessGroupMeshrun.coalesced_none): MismatchError on
    every rank where another member's block made calls, a no-op where
    every member's is empty.

    A block that raises left torch's record of it behind (its manager has
    no ``finally``): every later all_reduce, all_gather_into_tensor and
    reduce_scatter_tensor on the group was recorded there and never made,
    returning None with the tensor as it was (gloo's too). Here the record
    goes, and a block that raised an Exception makes the agreement, failed
    (``_coalescing_manager(failed=ValueError)``), so that members whose
    block ended raise MismatchError naming it where they waited for a call
    this rank never made (its own error is what it raises).

    ``device=`` (torch's per-call coalescing, through the backend's
    ``_start_coalescing``, which meshrun's group has none of) is refused on
    a meshrun group before torch's manager starts: torch's raised "No
    backend type associated with device type cpu" after making its record,
    which it left behind (as above). Other groups are torch's alone."""
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    pg = c10d._get_default_group() if group is None else group
    if device is not None and _on_meshrun(pg):
        raise RuntimeError(f"rank {dist.get_rank()}: _coalescing_manager(device={device}) on a "
                           f"meshrun group: per-call coalescing needs the backend's "
                           f"_start_coalescing, which meshrun's has none of; leave device= "
                           f"out (the block's calls are then one coalesced call)")
    empty = False
    with _torch_coalescing(group, device, async_ops) as cm:
        try:
            yield cm
        except BaseException as e:
            if _on_meshrun(pg):
                c10d._world.pg_coalesce_state.pop(pg, None)
                if isinstance(e, Exception):    # (not on Ctrl-C's way out)
                    _failed_block(pg, e)
            raise
        empty = not c10d._world.pg_coalesce_state.get(pg, [None])
    if empty and _on_meshrun(pg):
        work = pg._get_backend(torch.device("cpu")).coalesced_none(async_ops)
        if async_ops:
            cm.append(work)     # (a failed one: cm.wait() raises its error, as the others')


def _failed_block(pg: Any, error: Exception) -> None:
    """The agreement of a ``_coalescing_manager`` block that raised ``error``
    on this rank: the members whose block ended fail their coalesced call;
    its own failure here is not this rank's error (that one goes on)."""
    try:
        pg._get_backend(torch.device("cpu")).coalesced_none(False, type(error).__name__)
    except (mesh.MeshError, ValueError):
        pass


# -- an object collective's object that does not pickle -----------------------------


_OBJECT_CALLS = ("all_gather_object", "gather_object", "broadcast_object_list",
                 "scatter_object_list")
"""torch's object collectives: each pickles on this rank, then makes one
collective on the group (the sizes' all_gather or broadcast) first."""


def _object_to_tensor(obj: Any, device: Any, group: Any, *args: Any, **kwargs: Any) -> Any:
    """torch's ``_object_to_tensor`` (c10d's, which its object collectives
    call to pickle this rank's object before any call reaches the group).
    Where pickling fails in one of _OBJECT_CALLS on a meshrun group, this
    rank first fails the collective the other members are in, naming
    itself and the error, then raises the error as before: else they
    waited there (gloo's too), and the group's calls went out of step, this
    rank's next call meeting their first."""
    try:
        return _torch_pickle(obj, device, group, *args, **kwargs)
    except Exception as e:
        call, pg = _object_call(), None
        if call is not None:
            try:
                pg = (dist.distributed_c10d._get_default_group() if group is None
                      else group)._get_backend(torch.device(device))
            except (RuntimeError, ValueError, TypeError):
                pass
        if call is not None and isinstance(pg, _pg()):
            pg.refuse_unpicklable(call, e)
        raise


def _object_call() -> str | None:
    """The object collective of torch's that called _object_to_tensor (its
    frame, or a comprehension's in it), else None (send_object_list's: no
    collective to fail)."""
    f: Any = sys._getframe(2)
    for _ in range(3):
        if f is None:
            break
        if f.f_globals.get("__name__") == "torch.distributed.distributed_c10d" \
                and f.f_code.co_name in _OBJECT_CALLS:
            return f.f_code.co_name
        if not f.f_code.co_name.startswith("<"):     # (<listcomp>, <genexpr>: look past)
            break
        f = f.f_back
    return None


# -- env:// under meshrun ---------------------------------------------------------


def _env_handler(url: str, timeout: timedelta = dist.default_pg_timeout,
                 **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
    """env:// under meshrun, and under mpirun or srun where nothing set
    torch's RANK and WORLD_SIZE (mesh.init() reads their own variables, as
    a meshrun script's does): torch's store over the process's mesh. A mesh
    made here for it serves a "meshrun" default group (_create takes it);
    for any other backend (gloo) it has done its work once the store is
    made, and is closed when torch lets go of this generator, as
    init_process_group returns (or fails): its threads and sockets do not
    outlive the group's start, as under torchrun there are none."""
    if not (env.by_mesh() or env.by_other_launcher()):
        yield from _torch_env(url, timeout=timeout, **kwargs)
        return
    made = _world.current() is None
    world = _process_mesh(timeout)
    try:
        query = dict(p.split("=", 1) for p in url.partition("?")[2].split("&") if "=" in p)
        for key, have in (("rank", world.rank), ("world_size", world.size)):
            if key in query and int(query[key]) != have:
                raise ValueError(f"init_process_group: {key}={query[key]} but this meshrun "
                                 f"job gives this process {key} {have}")
        yield _store_over(world, timeout), world.rank, world.size
        raise RuntimeError("meshrun's env:// rendezvous cannot be repeated in one process "
                           "group")
    finally:
        if made:
            _drop_unused(world)


def _drop_unused(world: Any) -> None:
    """Close ``world``, made for a store alone, unless a "meshrun" group took it."""
    global _owned
    if world is _default or world is not _owned:
        return
    _owned = None
    world.close()


def _c10d_store(hostname: str, port: int, rank: int, world_size: int,
                timeout: timedelta, *args: Any, **kwargs: Any) -> Any:
    """torch's store for env:// and tcp://, a client of rank 0's connecting
    again where its connection closed while it connected: a rank that
    init()s again at once after destroy_process_group may reach the store
    rank 0 served for the group just destroyed as rank 0 drops it (rank 0
    then serves a new one there; _mesh_over_store's case, a moment
    earlier). A client that cannot connect at all fails as before (torch
    retries a refused connection until ``timeout`` itself)."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            return _torch_store(hostname, port, rank, world_size, timeout, *args, **kwargs)
        except dist.DistNetworkError:
            if rank == 0 or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)        # (not a hot loop where it fails at once)


def comm_of(group: Any = None) -> Any:
    """The meshrun communicator under a torch.distributed group on the
    "meshrun" backend (None: the default group; a one-dimensional
    DeviceMesh: its group), for meshrun's own API on the same ranks:
    ``collectives.*``, ``mesh.grid``, ``engine.parallelize`` (which calls
    this itself when given a group or a DeviceMesh)."""
    import torch
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"comm_of: rank {dist.get_rank()} is not a member of the group "
                         "(dist.new_group returned it the non-member placeholder)")
    if group is None:
        group = dist.distributed_c10d._get_default_group()
    elif hasattr(group, "get_group") and hasattr(group, "mesh_dim_names"):   # a DeviceMesh
        if group.ndim != 1:
            raise ValueError(f"comm_of takes a one-dimensional DeviceMesh (one of its "
                             f"dimensions: mesh['tp']), not one of {group.ndim}")
        group = group.get_group()
    backend = group._get_backend(torch.device("cpu")) \
        if isinstance(group, dist.ProcessGroup) else group
    if not isinstance(backend, _pg()):
        name = dist.get_backend(group) if isinstance(group, dist.ProcessGroup) else type(
            group).__name__
        raise TypeError(f"comm_of: the group is on the {name!r} backend; meshrun's own "
                        f"collectives run on a group of the 'meshrun' backend "
                        f"(dist.init_process_group('meshrun'), dist.new_group(...))")
    return backend.comm


def _process_mesh(timeout: timedelta | None = None) -> Any:
    """The process's open mesh, or a new one (mesh.init(), owned here)."""
    global _owned
    m = _world.current()
    if m is None:
        m = _owned = mesh.init(rendezvous_timeout=_assembly(timeout))
    return m


def _assembly(timeout: Any) -> float:
    """How long a new mesh waits for every rank: init_process_group's
    timeout where it is shorter than MESH_RENDEZVOUS_TIMEOUT (as gloo's
    store waits honour it)."""
    limit = config_float("MESH_RENDEZVOUS_TIMEOUT", 120.0, above=0)
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else None
    return min(limit, seconds) if seconds and seconds > 0 else limit


def _store_over(world: Any, timeout: timedelta) -> Any:
    """A TCPStore rank 0 starts on port 0; the others learn the port over the
    mesh. Every rank has connected before any returns (a mesh barrier, which
    names a rank lost meanwhile): a rank 0 that then failed in
    init_process_group (and dropped its store) left the others retrying
    their connection for the whole timeout, 30 minutes by default. Both
    wait as long as init_process_group's timeout says, not the mesh's
    default (a rank may come to init minutes after the others)."""
    host = world.spec.master_addr
    given = timeout.total_seconds() if isinstance(timeout, timedelta) else 0.0
    secs = given if given > 0 else None     # (init_process_group's, 30 min by default)
    if world.rank == 0:
        store = dist.TCPStore(host, 0, world.size, True, timeout, wait_for_workers=False)
        C.broadcast_object(world, store.port, timeout=secs)
    else:
        port = C.broadcast_object(world, None, timeout=secs)
        store = dist.TCPStore(host, int(port), world.size, False, timeout)
    C.barrier(world, timeout=secs)
    return store


# -- the backend's creator --------------------------------------------------------


TORCH_MIN = (2, 8)
"""The oldest torch the backend runs on: before 2.8 torch's collective options
have no ``asyncOp`` on every call, and before 2.7 a Python Work handed to
torch's C++ (DDP's first broadcast) loses its Python side, so C++ waits on
it for ever (a helper session's runs of 2.1.2 and 2.7.1, 2026-12-04)."""


def _check_torch(version: str) -> None:
    """Refuse a torch older than TORCH_MIN by name, at init_process_group
    (importing this module, and the entry point at ``import torch``, still
    work there: they must never make ``import torch`` fail)."""
    parts = version.split("+")[0].split(".")
    try:
        have = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return                  # (a version string of its own: let it try)
    if have < TORCH_MIN:
        raise RuntimeError(f"meshrun backend: needs torch >= {TORCH_MIN[0]}.{TORCH_MIN[1]} "
                           f"(this is torch {version}): older torch's collective options "
                           f"lack asyncOp, and before 2.7 a Python Work handed to its C++ "
                           f"is lost (DDP would hang)")


def _create(opts: Any, _pg_options: Any) -> ProcessGroupMeshrun:
    """torch's call for each new group: the default one (no global ranks
    given) finds or makes the mesh; the others are groups of it."""
    global _default
    _check_torch(str(torch.__version__))
    ranks = list(opts.global_ranks_in_group)
    timeout = opts.timeout.total_seconds()
    if not ranks:
        m = _world.current()
        if m is None or (m.rank, m.size) != (opts.group_rank, opts.group_size):
            m = _mesh_over_store(opts.store, opts.group_rank, opts.group_size, opts.timeout)
        _default = m
        return _pg()(m, timeout, _closer(m), shared=m is not _owned)
    if _default is None or _default._closed:
        raise RuntimeError("meshrun backend: a 'meshrun' group is a group of the default "
                           "one's mesh: init_process_group('meshrun') first (a default group "
                           "on another backend has none)")
    comm = _default.group(ranks)
    if comm is None or comm.rank != opts.group_rank:
        raise RuntimeError(f"meshrun backend: group {ranks} does not map onto the mesh (rank "
                           f"{opts.group_rank} of torch's group)")
    return _pg()(comm, timeout)


def _closer(m: Any) -> Any:
    """What the default group's shutdown does: close the mesh if it was made here."""
    def close() -> None:
        global _owned, _default
        if _default is m:
            _default = None
        if m is _owned:
            _owned = None
            m.close()
    return close


def _mesh_over_store(store: Any, rank: int, size: int, timeout: Any = None) -> Any:
    """A new mesh whose rendezvous address rank 0 publishes in torch's store
    (one key per world size and generation: a job that init()s again with
    fewer ranks counts its joins apart from the first world's).

    destroy_process_group is no collective: a rank that init()s again at
    once (env://, tcp://) may reach the store rank 0 served for the group
    just destroyed, which rank 0 has not dropped yet, and count its join
    there (generation 1: that store's group made generation 0). Rank 0 then
    drops it (this rank's wait fails: the connection is closed) and serves
    a new one at the same address: this rank connects again (_reconnect)
    and joins there. (A store that outlives the group, torchrun's or one the
    caller keeps, stays: rank 0 joins the next generation in it. A store
    lost in generation 0 is rank 0's own, gone: that fails at once.)"""
    global _owned
    deadline = time.monotonic() + _assembly(timeout)
    while True:
        gen = None
        try:
            gen = (int(store.add(f"meshrun/joined/{size}", 1)) - 1) // size
            m = _owned = _mesh_of_generation(store, gen, rank, size,
                                             deadline - time.monotonic())
            return m
        except (dist.DistNetworkError, mesh.RendezvousError) as e:
            lost = e.__cause__ if isinstance(e, mesh.RendezvousError) else e
            if rank == 0 or gen == 0 or not isinstance(lost, dist.DistNetworkError) \
                    or time.monotonic() >= deadline:
                raise
            store = _reconnect(store, rank, size, deadline)


def _reconnect(store: Any, rank: int, size: int, deadline: float) -> Any:
    """``store`` (torch's prefixes kept) on a new connection to the address
    it reached, where rank 0's new TCPStore waits, in torch's rendezvous
    handler, for ``size`` workers to connect: a client made with the world
    size counts this rank there (a clone does not)."""
    raw = store
    while isinstance(raw, dist.PrefixStore):
        raw = raw.underlying_store
    limit = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
    try:
        dist.TCPStore(raw.host, raw.port, size, False, limit)
        return store.clone()
    except RuntimeError as e:
        raise mesh.RendezvousError(
            f"rank {rank}: init_process_group: torch.distributed's store at {raw.host}:"
            f"{raw.port} (rank 0's of the group destroyed before) closed, and rank 0 served no "
            f"new one there within {limit.total_seconds():.0f}s: {str(e).splitlines()[0]}"
        ) from e


def _mesh_of_generation(store: Any, gen: int, rank: int, size: int, limit: float) -> Any:
    host = _store_host(store)
    e = os.environ
    local = e.get("LOCAL_RANK", "0") if e.get("WORLD_SIZE") == str(size) else "0"
    local_size = e.get("LOCAL_WORLD_SIZE", "1") if e.get("WORLD_SIZE") == str(size) else "1"
    spec = env.JobSpec(rank, size, int(local), int(local_size), host, 0,
                       e.get("MESH_SECRET") or f"insecure:torch:{host}", serve_rendezvous=True,
                       agent_store=f"meshrun/rendezvous/{size}/{gen}")
    return mesh.init(spec=spec, store=store, rendezvous_timeout=max(limit, 1.0))


def _store_host(store: Any) -> str:
    """Where rank 0 can be reached: the TCPStore's host (rank 0 or torchrun's
    agent on its node serves it), else MASTER_ADDR, else this host."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    host = getattr(store, "host", None)
    return str(host) if host else os.environ.get("MASTER_ADDR", "127.0.0.1")


register()
