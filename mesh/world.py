"""Joining a job: ``mesh.init()`` binds this worker's sockets, rendezvouses,
connects to every peer and returns the world communicator."""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
import weakref
from typing import Any

import zmq

from . import auth, env, limits, liveness, rdvfile, rings, streams, torchelastic, wire
from .comm import Comm
from .errors import RendezvousError
from .rendezvous import RendezvousServer, join, tell_hosts
from .peer import config_bytes, config_flag, config_float, host_names
from .transport import Transport

__all__ = ["Mesh", "init", "current"]

_log = logging.getLogger("mesh.transport")
_open: "weakref.WeakSet[Mesh]" = weakref.WeakSet()


class Mesh(Comm):
    """The world communicator; also a context manager that closes the mesh."""

    def __init__(self, transport: Transport, ctx: zmq.Context, authenticator: auth.Authenticator,
                 spec: env.JobSpec, endpoints: list[str], server: RendezvousServer | None,
                 ipc_path: str) -> None:
        super().__init__(transport, range(transport.size), 0, "world")
        self.spec = spec
        self.hosts = transport.hosts     # each rank's host id (the same list as the transport's)
        self.endpoints = endpoints
        self._ctx, self._auth, self._server, self._ipc_path = ctx, authenticator, server, ipc_path
        self._closed = False
        self._pid = os.getpid()
        self.aside = False      # held beside the process's own world (a Spawn's bridge)
        _open.add(self)

    @property
    def local_rank(self) -> int:
        """This rank's index among the ranks its launcher started on its host."""
        return self.spec.local_rank

    @property
    def local_size(self) -> int:
        """How many ranks its launcher started on this rank's host (as the
        launcher says: LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE...)."""
        return self.spec.local_size

    @property
    def refused(self) -> int:
        """Connections refused because they did not present the job's secret."""
        return self._t.live.handshake_failures

    @property
    def bad_messages(self) -> int:
        return self._t.reader.bad_messages

    def close(self) -> None:
        """Leave the job: flush sends, tell peers, release sockets. Idempotent."""
        self._close(None)

    def _close(self, error: BaseException | None) -> None:
        """Close; when leaving because of ``error``, the goodbye says so and
        the peers fail at once whatever they wait for from this rank."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        if self._pid != os.getpid():    # a forked child's copy: the sockets are the parent's
            return
        failure = _failure(error)
        if failure and error is not None and os.environ.get("MESH_ERROR_FILE"):
            # under meshrun, the error is recorded before the goodbye tells the peers
            from .launch._bootstrap import record_first
            record_first(error)
        self._t.close(failure=failure)
        if self._server is not None:
            self._server.close()
        self._auth.close()
        self._ctx.term()
        try:
            if not self._ipc_path.startswith("@"):      # (an abstract one has no file)
                os.unlink(self._ipc_path)
        except OSError:
            pass
        if not _open:
            _stop_zmq_gc()

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._close(exc)


def _stop_zmq_gc(wait: float = 0.2) -> None:
    """Stop pyzmq's zero-copy garbage thread (and its context) that the
    mesh's large sends started, once nothing it tracks is left: the last
    mesh of the process is closed and its context terminated, so no message
    of ours is in flight; a zero-copy message of another context still held
    keeps it running. A later zero-copy send starts it again."""
    gc_mod = sys.modules.get("zmq.utils.garbage")
    zgc = getattr(gc_mod, "gc", None)
    if zgc is None or not zgc.is_alive():
        return
    end = time.monotonic() + wait
    while zgc.refs and time.monotonic() < end:      # (releases arrive on its thread)
        time.sleep(0.005)
    if not zgc.refs:
        zgc.stop()


def _failure(exc: BaseException | None) -> str:
    """What a goodbye says of the error a rank leaves with ('' for none)."""
    if exc is None or (isinstance(exc, SystemExit) and exc.code in (None, 0)):
        return ""
    said = str(exc)     # (a KeyboardInterrupt says nothing: "KeyboardInterrupt", not "...: ")
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


@atexit.register
def _close_at_exit() -> None:
    """Close the meshes a program left open: as failed after an uncaught
    exception (the interpreter, and meshrun's bootstrap, leave it in
    sys.last_value), so the peers learn of it at once; else cleanly. Not in
    a forked child: the sockets are its parent's."""
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    for m in list(_open):
        if m._pid != os.getpid():
            continue
        try:
            m._close(exc)
        except Exception:
            _log.exception("rank %d: closing the mesh at exit failed", m.rank)


def _tcp_host(master_addr: str, across_hosts: bool = False, deadline: float = 0.0,
              rank: int = 0) -> str:
    """The address to bind tcp:// on: the one this host reaches MASTER_ADDR
    from (MESH_IFADDR overrides). In a job across hosts, "*" on MASTER_ADDR's
    own host when its name resolves to loopback there (Debian maps the host
    name to 127.0.1.1): the other hosts reach it by that name. Across hosts,
    while MASTER_ADDR has no route (a link down, not up yet), it waits for
    one until ``deadline`` (time.monotonic()), then raises naming it: a
    loopback address published would have every peer on another host
    connect to itself, and the job fail later with peers found silent."""
    forced = os.environ.get("MESH_IFADDR")
    if forced:
        return forced
    if env.is_loopback(master_addr):
        return "127.0.0.1"
    warned = False
    while True:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master_addr, 9))
                host = str(s.getsockname()[0])
            break
        except OSError as e:
            if not across_hosts:    # (its peers all take ipc://)
                return "127.0.0.1"
            why = f"rank {rank}: cannot reach MASTER_ADDR {master_addr} from this host ({e})"
            if time.monotonic() >= deadline:
                raise RendezvousError(f"{why} until the rendezvous timed out: no address for "
                                      f"the peers on other hosts to reach this rank at (set "
                                      f"MESH_IFADDR to bind one)") from None
            if not warned:
                warned = True
                _log.warning("%s; waiting for a route until the rendezvous timeout", why)
            time.sleep(0.2)
    return "*" if across_hosts and env.is_loopback(host) else host


def _tell_hosts(table: list[dict[str, Any]], hosts: list[str]) -> None:
    """Under meshrun, a job across hosts: where each rank is, as errors name
    its host (mesh.peer.host_names), left in the run folder for meshrun's
    table (mesh.rdvlaunch.tell_hosts), which said its own host name of
    every rank: another node's host, one name for hosts that share it."""
    folder = os.environ.get("MESH_RUNTIME_DIR")
    if not folder or not os.environ.get("MESH_NODE_RANK") or len(set(hosts)) < 2 \
            or not env.by_mesh():
        return
    tell_hosts(folder, host_names(hosts, [str(p["endpoints"].get("tcp", "")) for p in table]),
               [p.get("pid") or 0 for p in table])


def _tcp_endpoint(router: zmq.Socket, spec: env.JobSpec, deadline: float = 0.0) -> str:
    """Bind tcp:// and say where peers connect. Bound on "*" by _tcp_host,
    this is MASTER_ADDR's host, which the other hosts know by MASTER_ADDR."""
    host = _tcp_host(spec.master_addr, spec.size > spec.local_size, deadline, spec.rank)
    try:
        router.bind(f"tcp://{host}:0")
    except zmq.ZMQError as e:
        forced = os.environ.get("MESH_IFADDR")
        if not forced:
            raise
        raise RendezvousError(f"rank {spec.rank}: cannot bind tcp:// on MESH_IFADDR={forced!r} "
                              f"({zmq.strerror(e.errno or 0)}): set it to an address or interface "
                              f"of this host, or unset it") from None
    bound = router.getsockopt_string(zmq.LAST_ENDPOINT)
    if host != "*" or os.environ.get("MESH_IFADDR"):
        return bound
    return f"tcp://{spec.master_addr}:{bound.rsplit(':', 1)[1]}"


def _serve(spec: env.JobSpec, ctx: zmq.Context, curve: bool) -> RendezvousServer:
    """Rank 0's rendezvous service: on MASTER_PORT, or on a port of its own
    where it publishes the address (torchrun's store, mpirun's file)."""
    published = spec.agent_store or spec.rendezvous_file
    try:
        return RendezvousServer(spec.size, spec.secret, host="*",
                                port=0 if published else spec.master_port, ctx=ctx,
                                curve=curve).start()
    except RendezvousError as e:
        if published or not spec.source:
            raise
        raise RendezvousError(f"rank 0: {e} (read: {spec.source}; set MASTER_PORT to a free "
                              "port)") from e


def current() -> Mesh | None:
    """The mesh this process has open (its ``mesh.init()``, or the world
    ``mesh.spawn`` handed it), or None when it has none or several; a mesh
    held aside (a Spawn's bridge in its parents) is not counted."""
    mine = [m for m in list(_open) if m._pid == os.getpid() and not m._closed
            and not m.aside]
    return mine[0] if len(mine) == 1 else None


def rank_said() -> str:
    """"rank R: ", this process's mesh's rank, to start an error with where
    no communicator is at hand ("" without one open)."""
    m = current()
    return "" if m is None else f"rank {m.rank}: "


def _refuse_a_second(spec: env.JobSpec) -> None:
    """Raise where this process has the job's mesh open already (torch's
    init_process_group twice raises too): a second one waited for every
    rank in a new round of the rendezvous, its peers' ranks having ended
    waited in their close for the first one's goodbye, and the report said
    the rank never joined. Another job's mesh (collectives.torchdist's, of
    another world size) may be open beside it."""
    for m in list(_open):
        if m._pid == os.getpid() and not m._closed and m.spec == spec:
            raise RuntimeError(f"rank {spec.rank}: mesh.init: this process has the job's mesh "
                               f"open already (rank {m.rank} of {m.size}, from an earlier "
                               f"mesh.init() or mesh.spawn): use that one, or close it first "
                               f"(mesh.init() after a close joins the job anew)")


_SWITCHES = ("MESH_SHM", "MESH_CMA", "MESH_CURVE", "MESH_FORCE_TCP", "MESH_COLL_PIPELINE",
             "MESH_COLL_SMALL_COLUMNS", "MESH_COLL_LINK", "MESH_COLL_STREAM",
             "MESH_COLL_STREAM_KEEP", "MESH_MALLOC_TUNE")


def check_config() -> None:
    """Raise, naming the variable, for a setting that would fail or turn the
    wrong way only later (at a first collective across hosts, at close) or
    only where a rank has peers on other hosts (MESH_MALLOC_TUNE): every
    switch, MESH_COLL_STREAM_MIN, the waits read at close, and what the
    transport reads after the rendezvous (liveness, the same-host paths)."""
    for name in _SWITCHES:
        config_flag(name, False)
    config_bytes("MESH_COLL_STREAM_MIN", 0)
    config_bytes("MESH_SHM_MIN", 0)
    streams.min_bytes(False)
    if config_bytes("MESH_WINDOW_BYTES", 1) < 1:    # (0: one message at a time, every peer)
        raise ValueError(f"MESH_WINDOW_BYTES={os.environ['MESH_WINDOW_BYTES']!r}: must be at "
                         f"least 1 (each message waited for the one before it to be received)")
    liveness.config(2)
    rings.config(1)
    config_float("MESH_CLOSE_WAIT", 30.0, least=0)
    config_float("MESH_CLOSE_LINGER", 5.0, least=0)
    config_float("MESH_SPIN_US", 200.0, least=0)


def _ipc_path(name: str) -> str:
    """Where this rank's ipc:// socket ``name`` goes: the launcher's folder
    (MESH_RUNTIME_DIR: meshrun's and mesh.spawn's, which they remove), else,
    on Linux, the abstract namespace (``@name``: no file, gone with the
    process however it ends, where a file in /tmp stayed behind every rank
    that torchrun, mpirun or srun stopped with SIGTERM; the job's secret
    guards it as it does every endpoint), else the temporary folder or
    /tmp, where the path fits a Unix socket's address (107 bytes)."""
    limit = getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 107
    linux = sys.platform.startswith("linux")
    for folder in (os.environ.get("MESH_RUNTIME_DIR"), None if linux else tempfile.gettempdir(),
                   None if linux else "/tmp"):
        if folder and len(os.fsencode(path := os.path.join(folder, name))) <= limit:
            return path
    if linux:
        return "@" + name
    raise RuntimeError(f"no folder for this rank's socket {name} has a path short enough for "
                       f"a Unix socket ({limit} bytes): set TMPDIR to a shorter one")


def init(timeout: float | None = None, rendezvous_timeout: float | None = None, *,
         spec: env.JobSpec | None = None, store: Any = None) -> Mesh:
    """Join the job described by the environment (meshrun, torchrun, SLURM,
    Open MPI). ``timeout`` is the default for every blocking operation
    (MESH_TIMEOUT, else 300 s); with no job variables this is a world of one.
    While this process has the job's mesh open, a second one raises.

    ``spec`` describes the job instead of the environment; with ``store`` (a
    torch.distributed Store all ranks share) rank 0 publishes where its
    rendezvous service listens there, under ``spec.agent_store``, as under
    torchrun (collectives.torchdist joins this way for tcp:// and file://)."""
    spec = spec if spec is not None else env.from_env()
    _refuse_a_second(spec)
    try:        # (a bad MESH_* variable: every rank raises it, each naming itself)
        check_config()
        op_timeout = timeout if timeout is not None else config_float("MESH_TIMEOUT", 300.0,
                                                                      above=0)
        rdv_timeout = rendezvous_timeout if rendezvous_timeout is not None else \
            config_float("MESH_RENDEZVOUS_TIMEOUT", 120.0, above=0)
        window = int(config_bytes("MESH_WINDOW_BYTES", 64 << 20))    # told to the peers (join)
        curve = auth.curve_wanted()
    except ValueError as e:
        raise ValueError(f"rank {spec.rank}: mesh.init: {e}") from None
    limits.open_files(limits.rank_fds(spec.size), f"rank {spec.rank} of a world of {spec.size}")
    ctx = limits.context(spec.size)
    authenticator = auth.Authenticator(ctx, spec.secret, curve)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.LINGER, 0)
    # No frame of ours is longer (payloads go in frames of FRAME_BYTES): a stranger
    # claiming a longer one, in its handshake too, is dropped before it is buffered.
    router.setsockopt(zmq.MAXMSGSIZE, wire.FRAME_BYTES + wire.MAX_HEADER)
    # every peer connects at once: over ipc:// one refused by a full backlog (ZeroMQ's
    # 100) is tried again (mesh.transport.links), later, the start held up meanwhile
    router.setsockopt(zmq.BACKLOG, 100 + spec.size)
    auth.make_server(router, spec.secret, curve)
    router_mon = liveness.watch_router(ctx, router)     # (before it binds: see there)
    ipc_path = _ipc_path(f"mr-{os.getpid()}-{secrets.token_hex(4)}.sock")
    server = None
    try:
        router.bind(f"ipc://{ipc_path}")
        started = time.monotonic()
        tcp_ep = _tcp_endpoint(router, spec, started + rdv_timeout)
        rdv_timeout = max(rdv_timeout - (time.monotonic() - started), 1.0)  # (a wait for a route)
        host = env.host_id(spec.rank, spec.size)
        eps = {"ipc": f"ipc://{ipc_path}", "tcp": tcp_ep}
        if spec.size == 1:
            table: list[dict[str, Any]] = [{"rank": 0, "host": host, "endpoints": eps}]
        else:
            if spec.serve_rendezvous and spec.rank == 0:
                server = _serve(spec, ctx, curve)
            rdv_addr, rdv_port = spec.master_addr, spec.master_port
            own_port = server.port if server is not None else None
            if spec.agent_store:
                rdv_addr, rdv_port = torchelastic.rendezvous_address(
                    spec, own_port, rdv_timeout, store)
            elif spec.rendezvous_file:
                rdv_addr, rdv_port = rdvfile.rendezvous_address(spec, own_port, rdv_timeout)
            try:
                table = join(ctx, rdv_addr, rdv_port, spec.secret, spec.rank,
                             spec.size, host, eps, rdv_timeout, curve, window,
                             first_here=spec.local_rank == 0)
            finally:
                if server is not None:
                    rdvfile.withdraw(spec)
    except BaseException:
        liveness.close_watched(router, router_mon)
        if server is not None:
            server.close()
        authenticator.close()
        ctx.term()
        raise
    hosts = [p["host"] for p in table]
    _tell_hosts(table, hosts)
    same_host_ipc = not config_flag("MESH_FORCE_TCP", False)
    endpoints = [p["endpoints"]["ipc"] if same_host_ipc and p["host"] == host
                 else p["endpoints"]["tcp"] for p in table]
    windows = [p.get("window") if type(p.get("window")) is int else None for p in table]
    transport = Transport(ctx, router, router_mon, spec.rank, spec.size, endpoints, spec.secret,
                          op_timeout, curve, hosts, [p.get("pid") or 0 for p in table], windows)
    return Mesh(transport, ctx, authenticator, spec, endpoints, server, ipc_path)
