"""MPI's dynamic processes (mpi4py's ``Spawn``, ``Spawn_multiple``,
``Comm.Get_parent``, ``Disconnect``): ``comm.Spawn(command, args, maxprocs)``, collective over
``comm``'s P ranks, starts ``maxprocs`` = n processes of ``command`` on the
root's host and joins them and the P parents in a new mesh, the bridge, of
P + n ranks (the parents 0..P-1 in ``comm``'s order, the children P..)::

    parents (comm, P ranks)            children (their COMM_WORLD, n ranks)
    bridge rank 0 .. P-1  <-- Intercomm -->  bridge rank P .. P+n-1

The bridge is an ordinary job: the root runs its rendezvous service
(mesh.rdvserver, port 0) with a fresh secret, which the children get in
their environment (torchrun's names, MESH_SECRET; their ``mesh.init()``
joins it) and the other parents by a ``bcast`` over ``comm``; while the
bridge assembles, the root tells the service of a child that ended
(mesh.rdvlaunch.Teller), so that every rank fails at once naming it. In a
parent the bridge is a mesh held aside (``mesh.world.current()`` stays the
parent's own world). Both sides' intercommunicator is inter.py's Intercomm
over the bridge's two groups; a child's COMM_WORLD is the bridge's group of
the children, so it outlives ``Disconnect``: the children's bridge closes
at their Finalize or exit, the parents' at their ``Disconnect`` (or exit),
when the root also closes the service. The root reaps its children at
exit (waiting for them as long as MESH_CLOSE_WAIT, then killing them)."""
from __future__ import annotations

import atexit
import numbers
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import mesh
from mesh import errors as mesh_errors
from mesh.auth import curve_wanted
from mesh.env import JobSpec, launcher_seal, torchrun_env
from mesh.peer import config_float
from mesh.rdvlaunch import Teller
from mesh.rdvserver import RendezvousServer

from .comm import Comm, Intracomm
from .inter import Intercomm
from .types import Exception as MPIException

__all__ = ["spawn", "join", "child_world", "get_parent", "disconnect", "ERR_SPAWN", "ARGV_NULL"]

ERR_SPAWN = 50          # (Open MPI's MPI_ERR_SPAWN)
ARGV_NULL: list[str] = []
MARK = "MESH_MPI_SPAWNED"
"""A child's word of its bridge, ``P:size:port``: checked against the mesh it
opened, so that a process the child starts (mesh.spawn, meshrun) with this
environment is not taken for one."""

# a launcher's variables of the parent's own job, which would describe the child wrongly
_PARENT_VARS = ("OMPI_COMM_WORLD_", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID", "SLURM_LOCALID",
                "MESH_ERROR_FILE", "TORCHELASTIC_ERROR_FILE", "MESH_NODE_RANK",
                "MESH_RESTART_COUNT", "MESH_LAUNCHER_PID", "MESH_RUNTIME_DIR", "GROUP_RANK",
                "ROLE_RANK", "MESH_MPI_SPAWNED")
_INFO_KEYS = ("wdir",)  # the info keys honoured (MPI's reserved: the working directory)


@dataclass
class _Bridge:
    """One Spawn's bridge as a process holds it; the root's also holds the
    children's processes and the rendezvous service."""
    mesh: Any
    parent_side: bool
    procs: list[subprocess.Popen] = field(default_factory=list)
    server: RendezvousServer | None = None

    def close(self, error: BaseException | None = None) -> None:
        """The parents' end: the bridge mesh, then the service (nothing of
        the bridge's left in this process but the children, reaped at exit)."""
        self.mesh._close(error)
        if self.server is not None:
            self.server.close()
            self.server = None


_held: list[_Bridge] = []     # the bridges this process opened as a parent (closed at exit)
_child: dict[str, Any] = {"parent": None}


def _fail(comm: Comm, call: str, what: str) -> str:
    return f"rank {comm.rank}: collectives.MPI {call}: {what}"


def _argv(command: Any, args: Any) -> list[str]:
    """The children's command line: ``command`` (a path, or a name looked up
    on PATH) and ``args``; a command not found raises naming it."""
    if not isinstance(command, (str, os.PathLike)) or not str(command):
        raise TypeError(f"command is a program's path or name, got {command!r:.60}")
    if args is None or args is ARGV_NULL:
        args = []
    if isinstance(args, (str, bytes)) or not all(isinstance(a, (str, os.PathLike))
                                                 for a in args):
        raise TypeError(f"args is a list of strings, got {args!r:.80}")
    prog = str(command)
    found = prog if os.sep in prog and os.access(prog, os.X_OK) and os.path.isfile(prog) \
        else shutil.which(prog) if os.sep not in prog else None
    if found is None:
        raise FileNotFoundError(f"command {prog!r} not found" + (
            " (not an executable file)" if os.sep in prog else " on PATH"))
    return [found, *(str(a) for a in args)]


def _wdir(info: Any) -> str | None:
    """``info``'s working directory (MPI's "wdir"); MPI.INFO_NULL (None) or
    an empty mapping: none. Keys not honoured are refused by name."""
    if info is None:
        return None
    items = getattr(info, "items", None)
    if items is None:
        raise TypeError(f"info is MPI.INFO_NULL or a mapping of MPI info keys, got "
                        f"{info!r:.60}")
    said = dict(items())
    other = sorted(k for k in said if k not in _INFO_KEYS)
    if other:
        raise NotImplementedError(f"info keys {other} are not honoured (only {list(_INFO_KEYS)})")
    wdir = said.get("wdir")
    if wdir is not None and not os.path.isdir(str(wdir)):
        raise FileNotFoundError(f"info's wdir {wdir!r} is not a folder")
    return None if wdir is None else str(wdir)


def _env(parents: int, rank: int, size: int, port: int, secret: str,
         run_id: str) -> dict[str, str]:
    """A child's environment: the parent's, less its own job's launcher
    variables, with the bridge's job as meshrun gives a rank its job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PARENT_VARS)}
    if "," in env.get("MESH_HOST_ID", ""):      # (one id per rank of the parents' job)
        del env["MESH_HOST_ID"]
    env.update(torchrun_env(env, rank, size, rank, size, "127.0.0.1", port, run_id))
    env.update(MESH_SECRET=secret, MESH_LAUNCHER="1", MESH_MPI_SPAWNED=f"{parents}:{size}:{port}")
    env["MESH_LAUNCHER_SEAL"] = launcher_seal(env)
    return env


def _start(children: list[tuple[list[str], str | None]], parents: int, port: int,
           secret: str) -> list[subprocess.Popen]:
    """The children (each its command line and working directory), their
    output the parent's own (meshrun's relay prefixes it as the root's);
    all stopped if one cannot start."""
    run_id, size = secrets.token_hex(8), parents + len(children)
    procs: list[subprocess.Popen] = []
    try:
        for i, (argv, wdir) in enumerate(children):
            procs.append(subprocess.Popen(argv, env=_env(parents, parents + i, size, port,
                                                         secret, run_id),
                                          cwd=wdir, stdin=subprocess.DEVNULL))
    except OSError:
        _stop(procs)
        raise
    return procs


def _children(command: Any, args: Any, maxprocs: Any, info: Any,
              multiple: bool) -> tuple[list[tuple[list[str], str | None]], list[int]]:
    """The root's arguments, one (command line, working directory) a child;
    Spawn_multiple's lists, one item a command (``args`` None: none for
    any; ``maxprocs`` None: 1 each, an int: that many each, as mpi4py's;
    ``info`` one for all, or a list); and each command's count of children."""
    if not multiple:
        command, args, maxprocs, info = [command], [args], [maxprocs], [info]
    else:
        if isinstance(command, (str, bytes, os.PathLike)):     # (mpi4py's ValueError)
            raise ValueError(f"command is a list of commands, got {command!r:.60}")
        command = list(command)
        k = len(command)
        args = [None] * k if args is None else list(args)
        maxprocs = [1] * k if maxprocs is None else [maxprocs] * k \
            if isinstance(maxprocs, numbers.Integral) else list(maxprocs)
        info = [info] * k if info is None or hasattr(info, "items") else list(info)
        if not k or any(len(x) != k for x in (args, maxprocs, info)):
            raise ValueError(f"command, args, maxprocs and info are lists of one length (one "
                             f"item a command), got {k}, {len(args)}, {len(maxprocs)}, "
                             f"{len(info)}")
    out: list[tuple[list[str], str | None]] = []
    for c, a, m, i in zip(command, args, maxprocs, info):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"maxprocs must be a whole number of processes, 1 or more, "
                             f"got {m!r}")
        out += [(_argv(c, a), _wdir(i))] * int(m)
    return out, [int(m) for m in maxprocs]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _name(p: subprocess.Popen) -> str:
    return str(p.args[0] if isinstance(p.args, list) else p.args)


def _how(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _watch(procs: list[subprocess.Popen], server: RendezvousServer, parents: int,
           secret: str, done: threading.Event) -> None:
    """Until the bridge is complete: a child that ended is told to the
    service, which fails every rank waiting in the rendezvous, naming it."""
    teller = Teller("127.0.0.1", server.port, secret, server.world_size, server.curve)
    told: set[int] = set()
    try:
        while not done.is_set() and not server.complete.is_set():
            for i, p in enumerate(procs):
                code = p.poll()
                if code is not None and i not in told:
                    told.add(i)
                    teller.ended(parents + i, _how(code), p.pid)
            done.wait(0.05)
    finally:
        teller.close()


_RAISES = {"TypeError": TypeError, "ValueError": ValueError,
           "NotImplementedError": NotImplementedError}


def spawn(comm: Comm, command: Any, args: Any = None, maxprocs: Any = 1, info: Any = None,
          root: int = 0, errcodes: list[Any] | None = None, multiple: bool = False) -> Intercomm:
    """MPI_Comm_spawn (``multiple``: MPI_Comm_spawn_multiple), collective
    over ``comm``: ``command``, ``args``, ``maxprocs`` and ``info`` are the
    root's (as MPI's); the others wait for the bridge (module docstring).
    Returns the parents' Intercomm."""
    what = "Spawn_multiple" if multiple else "Spawn"
    if isinstance(comm, Intercomm) or not comm:
        raise TypeError(f"collectives.MPI {what}: over an intracommunicator (not COMM_NULL, "
                        f"not an intercommunicator)")
    if not 0 <= int(root) < comm.size:
        raise ValueError(_fail(comm, what, f"root {root} out of range (0..{comm.size - 1})"))
    parents = comm.size
    said: Any = None
    procs: list[subprocess.Popen] = []
    server = None
    if comm.rank == root:
        try:
            children, per = _children(command, args, maxprocs, info, multiple)
            hosts = _hosts(comm)
            if hosts:
                raise NotImplementedError(f"the parents are on several hosts ({hosts}): the "
                                          f"children start on the root's host, where every "
                                          f"parent must be")
            secret = secrets.token_hex(16)
            server = RendezvousServer(parents + len(children), secret,
                                      curve=curve_wanted()).start()
            procs = _start(children, parents, server.port, secret)
            said = {"port": server.port, "secret": secret, "n": len(children),
                    "per": per,
                    "command": " ".join(sorted({c[0][0] for c in children}))}
        except (OSError, TypeError, ValueError, NotImplementedError, mesh.MeshError) as e:
            if server is not None:
                server.close()
            said = {"error": type(e).__name__, "text": str(e)}
    said = comm.bcast(said, root=root)
    if "error" in said:
        kind = _RAISES.get(said["error"])
        text = _fail(comm, what, said["text"])
        if kind is not None:
            raise kind(text)
        raise MPIException(ERR_SPAWN, f"{text} (MPI.ERR_SPAWN)")
    n, size = said["n"], parents + said["n"]
    try:
        inter = join(what, comm.rank, size, said["port"], said["secret"], 0, parents,
                     server, procs)
    except (mesh_errors.LostPeerError, mesh_errors.RendezvousError) as e:
        text = _fail(comm, what, f"the {n} process{'es' if n > 1 else ''} of "
                                 f"{said['command']!r} (bridge ranks {parents}.."
                                 f"{size - 1}) never joined: {e}")
        if isinstance(e, mesh_errors.LostPeerError):
            raise mesh_errors.LostPeerError(text, e.peer) from e
        raise mesh_errors.RendezvousError(text) from e
    if errcodes is not None:        # (Spawn_multiple's: a list of them a command, as mpi4py's)
        codes: list[Any] = [[0] * k for k in said["per"]] if multiple else [0] * n
        errcodes[:] = codes
    return inter


def join(what: str, rank: int, size: int, port: int, secret: str, lo: int,
         nl: int, server: RendezvousServer | None = None,
         procs: list[subprocess.Popen] | None = None) -> Intercomm:
    """Join a bridge of ``size`` ranks as its rank ``rank`` (the local group
    ``nl`` ranks from ``lo``, the remote group the rest), held aside; the
    Intercomm over it. With ``server`` (the bridge's rendezvous service,
    this rank's) and ``procs`` (the children it started): a child that ends
    is told to the service while the bridge assembles; on failure they are
    stopped and the service closed."""
    spec = JobSpec(rank, size, rank, size, "127.0.0.1", port, secret, serve_rendezvous=False,
                   source=f"collectives.MPI {what}")
    procs = procs or []
    done = threading.Event()
    watcher = None
    if server is not None and procs:
        watcher = threading.Thread(target=_watch, args=(procs, server, nl, secret, done),
                                   name="mpi-spawn-watch", daemon=True)
        watcher.start()
    try:
        bridge = mesh.init(spec=spec)
    except BaseException:
        _stop(procs)
        if server is not None:
            server.close()
        raise
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
    bridge.aside = True     # (mesh.world.current(): still this process's own world)
    held = _Bridge(bridge, True, procs, server)
    _held.append(held)
    union = bridge.group(range(size))
    assert union is not None
    ro = nl if lo == 0 else 0
    inter = Intercomm(union, lo, nl, ro, size - nl)
    inter._bridge = held
    return inter


def _hosts(comm: Comm) -> list[str]:
    """The parents' hosts where they are not all on one ([] where they are)."""
    world = mesh.world.current()
    hosts = getattr(world, "hosts", None)
    if world is None or hosts is None:
        return []
    mine = sorted({hosts[r] for r in comm.mesh.ranks})
    return mine if len(mine) > 1 else []


def child_world(w: Any) -> Comm | None:
    """In a spawned child, whose mesh ``w`` is its Spawn's bridge: its
    COMM_WORLD (the bridge's group of the children), the parents'
    Intercomm kept for Get_parent; None in any other process."""
    mark = os.environ.get(MARK, "").split(":")
    if len(mark) != 3 or not all(m.isdigit() for m in mark):
        return None
    parents, size, port = (int(m) for m in mark)
    spec = getattr(w, "spec", None)
    if spec is None or (spec.size, spec.master_port) != (size, port) or w.rank < parents:
        return None
    world = w.group(range(parents, size))
    union = w.group(range(size))
    assert world is not None and union is not None
    inter = Intercomm(union, parents, size - parents, 0, parents)
    inter._bridge = _Bridge(w, False)
    _child["parent"] = inter
    out = Intracomm(world)
    out.Set_name("MPI_COMM_WORLD")
    return out


def get_parent() -> Comm:
    """A spawned child's Intercomm to its parents (until its Disconnect);
    in a process not spawned an Intercomm equal to COMM_NULL (mpi4py's)."""
    if os.environ.get(MARK):
        from .. import MPI
        MPI.COMM_WORLD          # (joins the bridge on first use)
    parent = _child["parent"]
    return Intercomm() if parent is None else parent


def disconnect(inter: Intercomm) -> None:
    """MPI_Comm_disconnect, collective over both groups: a barrier (what
    was sent is received), then the parents close the bridge; a child only
    forgets its parents (its COMM_WORLD is the bridge's)."""
    held: _Bridge | None = getattr(inter, "_bridge", None)
    if held is None:
        inter.Barrier()
        return
    try:
        inter.Barrier()
    except BaseException as e:      # (a peer lost: the bridge closed all the same)
        _leave(inter, held, e)
        raise
    _leave(inter, held, None)


def _leave(inter: Intercomm, held: _Bridge, error: BaseException | None) -> None:
    if held.parent_side:
        held.close(error)
        if held in _held:
            _held.remove(held)
        _disconnected.extend(held.procs)
        _disconnected[:] = [p for p in _disconnected if p.poll() is None]
    elif _child["parent"] is inter:
        _child["parent"] = None
    inter._bridge = None
    inter._g = None         # type: ignore[assignment]  # (now MPI.COMM_NULL's equal, as mpi4py's)


@atexit.register
def _reap() -> None:
    """At exit: the bridges a parent left open closed (as failed after an
    uncaught exception: the children hear it), then the root's children
    waited for (MESH_CLOSE_WAIT, 30 s) and killed past it."""
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    procs = [p for b in list(_held) for p in b.procs]
    for b in list(_held):
        try:
            b.close(exc)
        except Exception:
            pass
    _held.clear()
    procs += _disconnected
    end = time.monotonic() + config_float("MESH_CLOSE_WAIT", 30.0, least=0)
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"collectives.MPI: spawned process {p.pid} ({_name(p)}) still running at "
                  f"exit after MESH_CLOSE_WAIT: killed", file=sys.stderr, flush=True)
            p.kill()
            p.wait()
        else:
            if p.returncode:
                print(f"collectives.MPI: spawned process {p.pid} ({_name(p)}) ended: "
                      f"{_how(p.returncode)}", file=sys.stderr, flush=True)


_disconnected: list[subprocess.Popen] = []
