"""The process limits a world needs as it grows.

Every rank holds about five file descriptors per peer (its DEALER's
connection and ZeroMQ's mailboxes for the DEALER and its monitor, and the
peer's connection into our ROUTER), and three ZeroMQ sockets per peer (the
DEALER, its monitor and the monitor's own end). Common defaults run out
early: a soft limit of 256 open files (macOS) stops a world near 45 ranks,
1024 (most Linux logins) near 190, and libzmq's 1023 sockets per context near
340. A rank, and the parent that starts the ranks, raise what they need at
start, within the hard limit, as MPI launchers do.

Threads: N ranks on one host each running a BLAS (numpy's OpenBLAS, torch)
with a thread per core run N times as many threads as there are cores; a
numpy pipeline of four ranks on two cores stepped ten times slower so. The
launchers give each of their N local ranks cpus/N threads unless
OMP_NUM_THREADS is set (``thread_share``), as torchrun does; mesh.spawn's
ranks, forked from a server that has loaded numpy already, also set the
loaded OpenBLAS's count (``limit_threads``).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any, Mapping

__all__ = ["FDS_PER_PEER", "rank_fds", "hard_open_files", "open_files", "context", "thread_share",
           "env_threads", "limit_threads"]

_log = logging.getLogger("mesh.transport")
FDS_PER_PEER = 6    # five measured, and one to spare
_BASE_FDS = 256     # the interpreter, the libraries, the user's own files
_SOCKETS_PER_PEER = 3
_BASE_SOCKETS = 64


def rank_fds(size: int) -> int:
    """Open files one rank of a world of ``size`` needs."""
    return FDS_PER_PEER * size + _BASE_FDS


def too_many_for_open_files(size: int) -> str | None:
    """Why a world of ``size`` ranks cannot run under this host's hard limit
    on open files (None: it can). meshrun refuses such a job, and
    ``mesh.spawn`` too, before any rank starts: past it the ranks cannot
    connect (and spawn's timeout counts only once every rank has started)."""
    hard = hard_open_files()
    if hard is None or (FDS_PER_PEER - 1) * size + _BASE_FDS <= hard:
        return None
    return (f"a world of {size} ranks needs about {rank_fds(size)} open files a rank "
            f"(about {FDS_PER_PEER - 1} a peer), but the hard limit is {hard} "
            f"(ulimit -Hn): raise it, or run fewer ranks")


def hard_open_files() -> int | None:
    """The hard limit on open files (None: none, or not POSIX)."""
    try:
        import resource
    except ImportError:
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else int(hard)


def open_files(need: int, who: str) -> int:
    """Raise this process's soft limit on open files to ``need`` when it is
    lower, up to the hard limit; return the limit now. When even the hard
    limit is lower, log a warning naming ``who`` (ZeroMQ would fail later)."""
    try:
        import resource
    except ImportError:     # not POSIX: nothing to raise
        return need
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft if soft != resource.RLIM_INFINITY else need
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new < need:
        _log.warning("%s needs about %d open files, but the limit is %d (ulimit -n; hard "
                     "limit %d): connections may fail; raise the hard limit", who, need, new,
                     hard)
    return new


def context(size: int) -> Any:
    """A ZeroMQ context with room for the sockets of a world of ``size``
    (libzmq fixes its socket table when the first socket is made)."""
    import zmq
    ctx = zmq.Context()
    want = _SOCKETS_PER_PEER * size + _BASE_SOCKETS
    if ctx.get(zmq.MAX_SOCKETS) < want:
        ctx.set(zmq.MAX_SOCKETS, want)
    return ctx


def thread_share(env: Mapping[str, str], local_ranks: int) -> str | None:
    """OMP_NUM_THREADS for one of ``local_ranks`` ranks on this host, cpus/N
    (at least 1); None when the environment sets it or there is one rank."""
    if "OMP_NUM_THREADS" in env or local_ranks <= 1:
        return None
    return str(max(1, (os.cpu_count() or 1) // local_ranks))


def env_threads(env: Mapping[str, str]) -> int | None:
    """The thread count OMP_NUM_THREADS gives (its first number: "4,2" is
    OpenMP's nested form), or None where it is unset or not a positive
    number."""
    return _count(env, "OMP_NUM_THREADS")


def _count(env: Mapping[str, str], name: str) -> int | None:
    """The first number of the thread-count variable ``name`` ("4,2": 4), or
    None where it is unset or not a positive number."""
    first = env.get(name, "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


_OPENBLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads", "openblas_set_num_threads")


def blas_default(env: Mapping[str, str]) -> int:
    """The thread count OpenBLAS starts with in ``env``: its own variables
    (OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS), then OMP_NUM_THREADS, else a
    thread per core; never more than the cores this process may run on
    (OpenBLAS caps what the variables ask at those: taskset, cpusets)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count()) or 1
    for name in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        asked = _count(env, name)
        if asked is not None:
            return min(asked, cores)
    return cores


def _openblas_libs() -> list[Any]:
    """The OpenBLAS libraries this process has loaded (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            names = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return []
    libs = []
    for path in names:
        if "openblas" in os.path.basename(path).lower() and ".so" in path:
            try:
                libs.append(ctypes.CDLL(path))
            except OSError:
                continue
    return libs


def pool_unreachable() -> bool:
    """Whether an OpenBLAS loaded here keeps its thread pool's state to itself
    (numpy 2.5's: no ``blas_server_avail``), so that ``_shrink_stopped_pool``
    cannot keep a forked child's stopped pool from restarting a thread per
    core."""
    for lib in _openblas_libs():
        if any(hasattr(lib, name) for name in _OPENBLAS_SETTERS) \
                and not hasattr(lib, "blas_server_avail"):
            return True
    return False


def limit_threads(n: int, torch: bool = True) -> None:
    """Use ``n`` threads in what this process loaded already: an OpenBLAS
    (numpy's own or the system's, found in /proc/self/maps; Linux) and,
    with ``torch``, torch. Libraries loaded later read OMP_NUM_THREADS. An
    OpenBLAS whose thread pool a fork stopped (mesh.spawn's ranks) restarts
    it with no more than ``n`` threads (``_shrink_stopped_pool``)."""
    if torch and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    for lib in _openblas_libs():
        for name in _OPENBLAS_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                _shrink_stopped_pool(lib, n)
                setter(ctypes.c_int(n))
                break


def _shrink_stopped_pool(lib: Any, n: int) -> None:
    """Where ``lib``'s OpenBLAS thread pool is not running (fork stops it:
    a rank forked by mesh.spawn from a process that loaded numpy with a
    thread per core), have it restart with at most ``n`` threads. Setting
    the count restarts the pool with as many as the library loaded with,
    and each thread past the first then spins about 0.1 s of a core waiting
    for work (OpenBLAS's thread timeout), though ``n`` is 1: every rank
    took a core from the others for its first 0.1 s, and an 8-byte round
    trip in that time took 2-4 ms, not 6 us (BENCHMARKS.md, eighteenth
    session). Done through the library's ``blas_server_avail`` and
    ``blas_num_threads``, and only where both exist and the pool is
    stopped; otherwise the setter is left to do what it does. (numpy 2.5's
    OpenBLAS keeps both symbols to itself: mesh.spawn's fork server starts
    its OpenBLAS with one thread instead, so that there is no pool to stop.)"""
    try:
        running = ctypes.c_int.in_dll(lib, "blas_server_avail")
        threads = ctypes.c_int.in_dll(lib, "blas_num_threads")
    except ValueError:
        return
    if running.value == 0 and threads.value > n >= 1:
        threads.value = n
