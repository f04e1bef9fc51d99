"""``mesh.spawn``: run ``fn(world, *args)`` on N fresh local processes joined
into one mesh; return results by rank, or raise the first failure with that
rank's own traceback. Every path is bounded: on failure or timeout all
processes are killed.

How the processes start: a fresh interpreter when it can import ``fn`` and
the classes of ``args`` by name (on Linux a fork of multiprocessing's fork
server: a clean process, started once, that has imported mesh; each rank
takes the caller's environment of the call); otherwise, on Linux, a fork of
the caller, so a function typed in ``python -c``, on standard input, in IPython
or a notebook, a lambda or a closure runs too. The fork happens before the
rendezvous service exists, so a child inherits no ZeroMQ context of ours;
each child then builds its own mesh and never touches the parent's objects.
Forking a process that runs threads (a live mesh of its own, thread pools)
can deadlock the child; that risk is taken only when there is no other way.

The ranks die with the caller: on Linux the kernel kills them when the
process that spawned them dies, by a signal included (PR_SET_PDEATHSIG); the
fork server's ranks die with the server, which exits when the caller dies.
"""
from __future__ import annotations

import ctypes
import io
import math
import multiprocessing as mp
import numbers
import os
import pickle
import secrets
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
from typing import Any, Callable

from .auth import curve_wanted
from .env import launcher_seal, torchrun_env
from .errors import WorkerError
from .limits import (blas_default, env_threads, limit_threads, open_files, pool_unreachable,
                     thread_share, too_many_for_open_files)
from .rdvlaunch import remove_run_folder, run_folder
from .rdvserver import RendezvousServer
from .spawn_lines import _flush_std, _prefix_lines, _whole_lines

__all__ = ["spawn"]

_PORT_WAIT_S = 120.0  # a child waits this long for the parent's rendezvous port
_CLOSE_S = 10.0       # ranks that returned get this long to close their meshes and exit
_OUTER_RANKS = ("TORCHELASTIC_ERROR_FILE", "MESH_ERROR_FILE", "MESH_NODE_RANK",
                "MESH_RESTART_COUNT", "MESH_LAUNCHER_PID")
"""A meshrun rank's own variables (its error files, node, try, launcher), which a
spawn called in that rank must not hand on: its ranks wrote the outer rank's error
file (torch's @record), and the outer meshrun reported their error as the rank's."""


class _MainProbe(pickle.Pickler):
    """Pickles while noting whether something is pickled by a name in ``__main__``."""
    uses_main = False

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and \
                getattr(obj, "__module__", None) == "__main__":
            self.uses_main = True
        return NotImplemented


def _main_rebuilt() -> bool | None:
    """How a fresh interpreter rebuilds ``__main__``, as multiprocessing's spawn
    does: True from ``-m``'s module or the script's file (its names are found),
    False not at all (``python -c``, IPython), None it would fail (a
    ``__file__`` that is no file: standard input's ``<stdin>``)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    if path is None:
        return False
    return True if os.path.isfile(os.path.join(getattr(mp.process, "ORIGINAL_DIR", None) or "", path)) else None


def _by_name(fn: Callable[..., Any], args: tuple) -> bytes | None:
    """(fn, args) pickled for a fresh interpreter, or None when one could not
    load them: a lambda, a closure, names in a __main__ it cannot rebuild."""
    rebuilt = _main_rebuilt()
    if rebuilt is None:
        return None
    buf = io.BytesIO()
    probe = _MainProbe(buf, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        probe.dump((fn, args))
    except Exception:
        return None
    return None if probe.uses_main and not rebuilt else buf.getvalue()


def _can_fork() -> bool:
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


def _fresh_context() -> Any:
    """Where processes start from a clean interpreter: on Linux forked from
    multiprocessing's fork server (started once per caller, single-threaded,
    with mesh and the modules in MESH_SPAWN_PRELOAD already imported), so a
    rank starts in milliseconds instead of importing numpy and ZeroMQ anew;
    elsewhere a fresh interpreter, as where the fork server's socket would
    not fit its address (a long TMPDIR: ``_server_fits``)."""
    if not (_can_fork() and "forkserver" in mp.get_all_start_methods()) \
            or not (_server_running() or _server_fits()):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    extra = [m for m in os.environ.get("MESH_SPAWN_PRELOAD", "").split(",") if m.strip()]
    ctx.set_forkserver_preload(["mesh.spawn", *(m.strip() for m in extra), "mesh._served"])
    if pool_unreachable() and not _server_running():
        _start_server_with_one_blas_thread()
    return ctx


def _server_fits() -> bool:
    """Whether the fork server's Unix socket path fits an AF_UNIX address
    (107 bytes): multiprocessing binds it at <tmp>/pymp-XXXXXXXX/listener-XXXXXXXX
    (<tmp>: TMPDIR's folder), and fails with "AF_UNIX path too long" when a
    TMPDIR is longer than about 75 bytes."""
    from multiprocessing import process
    config = getattr(process.current_process(), "_config", {})
    folder = config.get("tempdir")          # multiprocessing's folder, once made
    if folder is None:
        folder = os.path.join(tempfile.gettempdir(), "pymp-XXXXXXXX")
    return len(os.fsencode(os.path.join(folder, "listener-XXXXXXXX"))) <= 107


def _server_running() -> bool:
    from multiprocessing import forkserver
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def _start_server_with_one_blas_thread() -> None:
    """Where numpy's OpenBLAS keeps its pool to itself (numpy 2.5: see
    mesh.limits.pool_unreachable), start the fork server with
    OPENBLAS_NUM_THREADS=1, so that the OpenBLAS it preloads with numpy has
    no thread pool for a fork to stop: a rank's share then grows it
    (``_child``), where a stopped pool would restart a thread per core,
    each spinning a core for its first 0.1 s. The server puts the caller's
    value back once its modules are loaded (mesh._served), and a rank gets
    the caller's environment back before it runs anything of the caller's;
    other processes the caller's own fork server starts run numpy's BLAS on
    one thread unless they set a count."""
    from multiprocessing import forkserver
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["MESH_SERVER_OPENBLAS"] = "unset" if saved is None else "=" + saved
    try:
        forkserver.ensure_running()
    finally:
        del os.environ["MESH_SERVER_OPENBLAS"]
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved


def _load(job: bytes | tuple, rank: int) -> tuple[Callable[..., Any], tuple]:
    if not isinstance(job, bytes):
        return job[0], job[1]
    try:
        fn, args = pickle.loads(job)
    except Exception as e:
        raise RuntimeError(
            f"mesh.spawn: rank {rank} cannot load its function and arguments ({e}); a new "
            f"process imports them by name: define fn (and the classes of its arguments) at "
            f"the top level of a module, not under `if __name__ == '__main__':`") from e
    return fn, args


def _die_with_parent(parent: int | None) -> None:
    """Have the kernel kill this rank when the process that spawned it dies,
    however it dies (SIGTERM or SIGKILL leave it no chance to kill its
    children): Linux's PR_SET_PDEATHSIG. A rank of the fork server (parent
    None) dies with the server, which exits as soon as the caller is gone.
    Elsewhere the rank notices when its pipe to the parent closes."""
    if not sys.platform.startswith("linux"):
        return
    if parent is None:
        _leave_server_alive_pipe()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent and parent is not None:  # it died before the request was made
        os._exit(1)


def _leave_server_alive_pipe() -> None:
    """The fork server exits when every holder of its "alive" pipe has gone;
    multiprocessing hands that pipe to each child too. A rank lets go of it,
    so that the server, and with it the ranks, end when the caller does."""
    from multiprocessing import forkserver
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None   # type: ignore[union-attr]
        server._forkserver_pid = None        # type: ignore[union-attr]


def _child(job: bytes | tuple, rank: int, size: int, secret: str, run_id: str,
           extra_env: dict[str, str], conn: Any, parent: int | None,
           environ: dict[str, str], prefix: bool = False) -> None:
    from .errors import LostPeerError, MeshError
    from .world import init
    _die_with_parent(parent)
    try:
        os.setpgid(0, 0)     # a group of its own: what it starts is stopped with it
    except OSError:
        pass
    if environ != os.environ:   # a fork server's child: the caller's environment of now
        os.environ.clear()
        os.environ.update(environ)
    held = signal.getsignal(signal.SIGINT)  # a fork of the caller: its handler, as it was
    if isinstance(getattr(held, "__self__", None), _Held):
        signal.signal(signal.SIGINT, held.__self__._old)    # type: ignore[union-attr]
    _whole_lines()
    if prefix:
        _prefix_lines(rank)
    from .launch._bootstrap import say_where
    say_where(_where_file(extra_env["MESH_RUNTIME_DIR"], rank))     # (asked at a timeout)
    world = None
    me = os.getpid()
    try:
        if not conn.poll(_PORT_WAIT_S):
            return  # the parent is gone
        port = conn.recv()
        for name in _OUTER_RANKS:
            os.environ.pop(name, None)
        os.environ.update(torchrun_env(os.environ, rank, size, rank, size, "127.0.0.1", port,
                                       run_id))       # (torchrun's, as meshrun gives them)
        os.environ.update({"MESH_SECRET": secret, "MESH_LAUNCHER": "1"})
        os.environ.update(extra_env)
        os.environ["MESH_LAUNCHER_SEAL"] = launcher_seal(os.environ)
        share = thread_share(os.environ, size)
        if share is not None:       # cpus/N threads, as meshrun gives its ranks
            os.environ["OMP_NUM_THREADS"] = share
        threads = env_threads(os.environ)
        if threads is not None:     # numpy (and torch) loaded before this rank's environment
            limit_threads(threads)
        elif parent is None:        # the fork server's OpenBLAS has one thread: the default
            limit_threads(blas_default(os.environ), torch=False)
        fn, args = _load(job, rank)
        world = init()
        result = fn(world, *args)
        if os.getpid() != me:       # a child fn forked, leaving fn: not the rank's result
            os._exit(0)
        try:
            done = pickle.dumps((True, result, 0.0, False), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise TypeError(f"rank {rank}: mesh.spawn: the value fn returned cannot be pickled "
                            f"to travel back ({type(result).__name__}: {e}); return plain "
                            f"data: numbers, strings, lists, dicts, numpy arrays, tensors"
                            ) from None
        conn.send_bytes(done)   # returned: the parent knows, while this rank closes
        world.close()
        _flush_std()            # (the parent stops the process once told it closed)
        conn.send_bytes(b"")    # closed: the parent need not wait for the interpreter's exit
    except BaseException as e:
        if os.getpid() != me:       # a child fn forked: its error is not the rank's
            code = e.code if isinstance(e, SystemExit) else 1
            if not isinstance(e, SystemExit):
                traceback.print_exc()
            os._exit(code if isinstance(code, int) else 1)
        # a lost peer or an abort is the consequence of another rank's failure
        secondary = isinstance(e, LostPeerError) or getattr(e, "from_abort", False) or (
            isinstance(e, MeshError) and "aborted" in str(e))
        _send(conn, (False, _told(e), time.time(), secondary))
        if world is not None:
            world._close(e)  # report first: closing waits for the peers' answers
    finally:
        _flush_std()
        conn.close()


def _told(e: BaseException) -> tuple[str, str]:
    """A failed rank's traceback for its WorkerError, brief and whole, from
    the user's function down (not this module's frame that called it)."""
    from .launch._bootstrap import brief_traceback
    tb = e.__traceback__
    if tb is not None and tb.tb_frame.f_globals is globals():
        tb = tb.tb_next
    full = "".join(traceback.format_exception(type(e), e, tb))
    try:
        brief = brief_traceback(e, tb, "WorkerError.full_traceback has them")
    except Exception:                        # never lose the error over its telling
        brief = full
    return brief, full


def _unguarded() -> bool:
    """Whether spawn's caller is the main script's own top level, outside
    any ``if __name__ == "__main__":`` (read from the script's source)."""
    import ast
    frame = sys._getframe(2)
    if frame.f_code.co_name != "<module>" or frame.f_globals.get("__name__") != "__main__":
        return False
    try:
        with open(frame.f_code.co_filename, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return False        # (no file to read: python -c, stdin; those fork anyway)

    def guard(node: ast.stmt) -> bool:
        test = node.test if isinstance(node, ast.If) else None
        return (isinstance(test, ast.Compare) and len(test.comparators) == 1 and any(
            isinstance(side, ast.Name) and side.id == "__name__"
            for side in (test.left, test.comparators[0])) and any(
            isinstance(side, ast.Constant) and side.value == "__main__"
            for side in (test.left, test.comparators[0])))
    line = frame.f_lineno
    return not any(guard(node) and node.lineno <= line <= (node.end_lineno or node.lineno)
                   for node in tree.body)


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout: float = 60,
          env: dict[str, str] | None = None, settle: float | None = 1.0,
          prefix: bool = False) -> list[Any]:
    """Run ``fn(world, *args)`` on ``nprocs`` local processes; return its
    results ordered by rank (they travel back pickled). When a rank fails,
    the others get ``settle`` seconds to end (their own errors, what they
    write) before all are stopped and the root cause is raised (None: the
    default, 1 s). ``prefix``: each line a rank prints starts with its rank,
    "[3] ...", as under meshrun (what it writes through sys.stdout and
    sys.stderr; not what goes to the descriptors themselves).

    A top-level function of an importable module runs in fresh interpreters.
    Anything else (``python -c``, stdin, a notebook, a lambda, a closure, a
    call at the main script's top level without ``if __name__ ==
    "__main__":``) runs in forks of this process on Linux, and raises
    ValueError elsewhere."""
    __tracebackhide__ = True    # (IPython's, Jupyter's and pytest's tracebacks skip this frame)
    if not callable(fn):
        raise TypeError(f"mesh.spawn: fn is the function each rank runs as fn(world, *args), "
                        f"got {type(fn).__name__} {fn!r:.60}")
    if isinstance(nprocs, bool) or not isinstance(nprocs, numbers.Integral):
        raise TypeError(f"mesh.spawn: nprocs is a whole number of ranks, got {nprocs!r}")
    if nprocs < 1:
        raise ValueError(f"mesh.spawn: nprocs must be at least 1, got {nprocs}")
    nprocs = int(nprocs)
    too_many = too_many_for_open_files(nprocs)
    if too_many:        # (ranks started one by one past it held the machine for minutes)
        raise ValueError(f"mesh.spawn: {too_many}")
    if timeout is None:
        timeout = 60
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"mesh.spawn: timeout is a number of seconds above 0, got {timeout!r}")
    if settle is None:
        settle = 1.0
    if isinstance(settle, bool) or not isinstance(settle, numbers.Real) \
            or not math.isfinite(settle) or settle < 0:     # checked before any rank starts
        raise ValueError(f"mesh.spawn: settle is a number of seconds, 0 or more (None: 1), "
                         f"got {settle!r}")
    bad = [k for k, v in (env or {}).items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"mesh.spawn: env values are strings, as in os.environ: env[{bad[0]!r}] "
                        f"is {(env or {})[bad[0]]!r}")
    payload = _by_name(fn, args)
    if payload is not None and _unguarded():
        # a fresh interpreter would import the script as __mp_main__ and run this
        # call again at its top level: fork, where that is safe, else say so
        if not _can_fork():
            raise ValueError("mesh.spawn called at the top level of the main script: its "
                             "ranks would import the script and call it again; put the call "
                             "under `if __name__ == \"__main__\":`")
        payload = None
    if payload is None and not _can_fork():
        raise ValueError(
            f"mesh.spawn: {getattr(fn, '__qualname__', fn)!r} (or an argument) cannot be "
            f"loaded by name in a new process: it is a lambda or a nested function, or it was "
            f"defined in __main__ without a file (python -c, standard input, a notebook), and "
            f"{sys.platform} cannot fork safely. Move it to a .py module, import it from "
            f"there and pass that function.")
    ctx = _fresh_context() if payload is not None else mp.get_context("fork")
    served = ctx.get_start_method() == "forkserver"
    job: bytes | tuple = payload if payload is not None else (fn, args)
    open_files(4 * nprocs + 256, f"mesh.spawn of {nprocs} ranks")  # pipes, connections
    secret, run_id = secrets.token_hex(16), secrets.token_hex(8)    # (TORCHELASTIC_RUN_ID)
    curve = curve_wanted({**os.environ, **(env or {})})
    server = None
    procs: list[Any] = []
    conns: list[Any] = []
    late: set[int] = set()      # the ranks still in fn at the timeout
    # the ranks' sockets live here, removed with it whatever becomes of them
    run_dir = run_folder("meshspawn")
    extra = {**(env or {}), "MESH_RUNTIME_DIR": run_dir}
    ok = False
    try:
        with _Held():   # a ^C now would leave a rank forked but not yet in procs
            for r in range(nprocs):
                parent, child = ctx.Pipe()
                # (not daemonic: a rank may start processes of its own, DataLoader workers,
                # a Pool; it dies with this process anyway, and is stopped below)
                p = ctx.Process(target=_child, name=f"mesh-rank-{r}", daemon=False,
                                args=(job, r, nprocs, secret, run_id, extra, child,
                                      None if served else os.getpid(), dict(os.environ),
                                      bool(prefix)))
                p.start()
                child.close()
                procs.append(p)
                conns.append(parent)
            # only now, with every child started (forked), the service and its ZeroMQ context
            server = RendezvousServer(nprocs, secret, curve=curve).start() if nprocs > 1 \
                else None
        for c in conns:
            try:
                c.send(server.port if server is not None else 0)
            except OSError:
                pass  # that child died already; _collect reports it
        results = _collect(procs, conns, timeout, settle, late, run_dir)
        ok = True
        return results
    except WorkerError as e:
        # raised from here alone: what the caller needs is the rank's traceback, in its
        # message; a notebook showed _collect's frames above it, with their source
        raise e.with_traceback(None)    # (the rank's own traceback is in its message)
    except KeyboardInterrupt:
        # ^C, a notebook's interrupt: the ranks (a process group of their own each) never
        # see it; stop them now, not after settle= (they were not told to end)
        late.update(range(len(procs)))
        raise
    finally:
        _stop(procs, conns, server, run_dir, ok, late, settle)


class _Held:
    """SIGINT held off while ranks start or are stopped, where this is the main
    thread: a notebook's interrupt pressed twice, the second while the first
    stopped the ranks, left them running, with the rendezvous service's threads
    in the kernel and the ranks' folder behind (the next spawn forked beside
    them). One that came is raised on leaving, unless an error already is."""
    hit = False

    def __enter__(self) -> "_Held":
        self._old: Any = None
        self._held = False
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not None:    # (None: not Python's)
            self._old = signal.signal(signal.SIGINT, self._hold)
            self._held = True
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        if self._held:
            signal.signal(signal.SIGINT, self._old)
        if self.hit and exc[0] is None and callable(self._old):
            self._old(signal.SIGINT, None)   # Python's own raises KeyboardInterrupt now


def _stop(procs: list[Any], conns: list[Any], server: Any, run_dir: str, ok: bool,
          late: set[int], settle: float) -> None:
    """The ranks ended, their pipes closed, the rendezvous service and the ranks'
    folder gone, whatever happens meanwhile: a ^C while the ranks are waited for
    ends the wait, one while they are stopped is held until they are."""
    try:
        if ok:      # every rank returned: let them close their meshes
            end = time.monotonic() + _CLOSE_S
            for p, c in zip(procs, conns):
                try:
                    c.poll(max(0.0, end - time.monotonic()))    # its "closed", or its end
                except OSError:
                    pass
        else:       # the ranks that ended their call end their process (what they started:
            # a DataLoader's workers and semaphores); those still in fn at the timeout are
            # stopped first: they were waited for settle= seconds more, and so were the
            # others, whose closes wait for them (a rank that returned, for a sleeping one)
            for r in late:
                procs[r].kill()
            end = time.monotonic() + settle
            for p in procs:
                if p.is_alive():
                    p.join(max(0.0, end - time.monotonic()))
    except KeyboardInterrupt:   # another ^C: stop waiting, stop them now
        interrupted = True
    else:
        interrupted = False
    with _Held():
        for p in procs:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)    # what the rank started, with it
                except (ProcessLookupError, PermissionError):
                    pass
        for p in procs:
            p.join(timeout=5)
        for c in conns:         # now, not when the error that holds these frames goes
            c.close()
        for p in procs:
            if p.exitcode is not None:
                p.close()
        if server is not None:
            server.close()
        remove_run_folder(run_dir)
    if interrupted:
        raise KeyboardInterrupt


def _send(conn: Any, message: tuple) -> None:
    """A rank's result to the parent, by plain pickle: the whole value in the
    message (a Connection's own pickler would share a torch tensor's memory
    through a file descriptor, which dies with the rank)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _ended(code: int | None) -> str:
    """How a rank's process ended without a result, in words."""
    if code is not None and code < 0:
        from .launch.records import signal_name
        return f"was killed by {signal_name(-code)}"
    return f"exited (code {code}) without returning from fn"


def _where_file(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank{rank}.where.json")


def _still_running(procs: list, pending: set[int], run_dir: str, wait: float) -> str:
    """'ranks still running: [1] (stopped)', and where each one said it was,
    asked (mesh.launch.records.ask_where) and given up to a second, no more
    than ``wait`` (settle=), to say it."""
    from .launch._bootstrap import SAY_WHERE
    from .launch.records import ask_where, where_text
    ranks = sorted(pending)
    said = ask_where({r: procs[r].pid for r in ranks}, {r: _where_file(run_dir, r)
                                                        for r in ranks},
                     SAY_WHERE, min(wait, 1.0)) if run_dir else {}
    where = "".join(f"\n  rank {r}: " + (where_text(said[r]) if r in said else
                                          "gave no word of where it was") for r in ranks)
    return f"ranks still running: {ranks} (stopped)" + (where if said else "")


def _collect(procs: list, conns: list, timeout: float, wait: float = 1.0,
             late: set[int] | None = None, run_dir: str = "") -> list[Any]:
    """Results by rank; on failure the root cause: a rank's own error before
    the lost-peer errors it caused elsewhere, the earliest first. At the
    timeout, the ranks still running are added to ``late``, and the error
    says where each one was (``_still_running``)."""
    results: list[Any] = [None] * len(procs)
    failures: list[tuple[bool, float, int, WorkerError]] = []
    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout
    settle = None
    while pending and (settle is None or time.monotonic() < settle):
        if time.monotonic() > deadline:
            if late is not None:
                late.update(pending)
            raise WorkerError(min(pending), _still_running(procs, pending, run_dir, wait),
                              head=f"mesh.spawn timed out after {timeout:g}s (rank "
                                   f"{min(pending)}: the first of those still running)")
        for r in sorted(pending):
            if conns[r].poll():
                try:
                    ok, payload, when, secondary = pickle.loads(conns[r].recv_bytes())
                except (EOFError, OSError):
                    procs[r].join(timeout=1)
                    failures.append((False, time.time(), r, WorkerError(
                        r, f"no result: the process {_ended(procs[r].exitcode)}",
                        procs[r].exitcode)))
                    pending.discard(r)
                    continue
                except Exception as e:       # sent whole, but not loadable here
                    failures.append((False, time.time(), r, WorkerError(
                        r, f"its result cannot be unpickled here: {type(e).__name__}: {e}")))
                    pending.discard(r)
                    continue
                pending.discard(r)
                if ok:
                    results[r] = payload
                else:
                    brief, full = payload
                    failures.append((secondary, when, r, WorkerError(r, brief, full=full)))
            elif not procs[r].is_alive() and not conns[r].poll():
                code = procs[r].exitcode
                failures.append((False, time.time(), r, WorkerError(
                    r, f"no result: the process {_ended(code)}", code)))
                pending.discard(r)
        if failures and settle is None:
            settle = time.monotonic() + wait
        time.sleep(0.002)
    if failures:
        raise min(failures, key=lambda f: (f[0], f[1], f[2]))[3]
    return results
