"""Rendezvous, the launcher's side: the run folder of the ranks a launcher
(meshrun, mesh.spawn) starts on this host, and its word that one of them
ended and will never join again, to two listeners:

    launcher --<run folder>/ended.<rank>--> its own ranks in join   (tell_ended)
    launcher --ended{rank, how}-----------> the service             (Teller)

A rank waiting in ``mesh.rendezvous.join`` fails at once, naming the rank
that ended: by its meshrun's file (``_ended_here``: the service may be gone
already, node 0's job over), or by the service's answer to the ranks that
wait there (mesh.rendezvous).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

try:
    import fcntl
except ImportError:     # (not POSIX: no lock; the pid alone decides)
    fcntl = None  # type: ignore[assignment]

import msgpack
import zmq

from . import auth

__all__ = ["run_folder", "remove_run_folder", "job_folder", "tell_ended", "tell_hosts",
           "read_hosts", "Teller"]

_LOCK = ".lock"
_held_here: dict[str, int] = {}     # run folders this process made -> its lock's fd


def run_folder(kind: str) -> str:
    """A new folder for the sockets and markers of the ranks a launcher
    (``kind``: meshrun, meshspawn) starts on this host, named after the
    launcher's pid and locked (flock) while it lives; first, the folders
    of its kind that launchers killed before they could remove them left
    are removed: their pid gone and their lock free (a launcher in another
    PID namespace sharing /tmp holds its lock, though its pid is not seen
    here). ``remove_run_folder`` removes it."""
    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith(f"{kind}-")]
    except OSError:
        names = []
    for name in names:
        pid = name.split("-")[1]
        path = os.path.join(base, name)
        try:
            if not pid.isdigit() or os.stat(path).st_uid != os.getuid() or _locked(path):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:      # (another user's process: alive; or the folder went)
            pass
    path = tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-")
    if fcntl is not None:
        _lock(path)
    return path


def _lock(path: str) -> None:
    """Lock the new run folder ``path`` for as long as this process lives;
    one that cannot be locked (no descriptor left: EMFILE) is removed, and
    the error names it: left unlocked, a launcher in another PID namespace
    sharing /tmp took it for a dead launcher's and removed it."""
    fd = -1
    try:
        fd = os.open(os.path.join(path, _LOCK), os.O_CREAT | os.O_RDWR, 0o600)
        _flock_new(fd)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        raise OSError(e.errno, f"cannot lock the run folder {path} "
                               f"({e.strerror or e})") from e
    _held_here[path] = fd


def _flock_new(fd: int) -> None:
    """Lock a new run folder's lock file. Another launcher starting at the
    same moment may hold it for an instant (``_locked``'s look at every
    folder of the kind, ours included): try again for up to a second."""
    for _ in range(200):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.005)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _locked(path: str) -> bool:
    """Whether a live launcher holds the lock of run folder ``path`` (one
    without a lock file, an older launcher's: no)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(os.path.join(path, _LOCK), os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def job_folder(run_id: str) -> str:
    """The folder a job keeps between its tries on this host (hvd.elastic's
    commits): named after the user and the job's TORCHELASTIC_RUN_ID, the
    same in every try; meshrun removes it when the job ends well. Not made
    here."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    safe = "".join(c if c.isalnum() or c in "._" else "_" for c in run_id) or "none"
    return os.path.join(tempfile.gettempdir(), f"meshrun-job-{uid}-{safe}")


def remove_run_folder(path: str) -> None:
    """Remove a folder ``run_folder`` made, and let go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held_here.pop(path, None)
    if fd is not None:
        os.close(fd)


def tell_ended(folder: str, rank: int, how: str) -> None:
    """A launcher's word to its own ranks, in its run folder, that its rank
    ``rank`` ended (``how``) and will never join again: a rank of this node
    still in ``join`` fails at once, naming it, as the service fails the
    ranks that wait there (``Teller``). Where the service had gone already
    (node 0's job over: its ranks failed at once), such a rank waited its
    whole rendezvous timeout, or until its meshrun stopped it after
    --settle (3 s)."""
    part = os.path.join(folder, f".ended.{rank}")
    try:        # (whole or not at all)
        with open(part, "w") as f:
            f.write(how[:200])
        os.replace(part, os.path.join(folder, f"ended.{rank}"))
    except OSError:
        pass


_HOSTS = "hosts.json"


def tell_hosts(folder: str, names: list[str], pids: list[int]) -> None:
    """The ranks' word to their meshrun, in its run folder, of where each
    rank of a job across hosts is (by world rank: its host as errors name
    it, mesh.peer.host_names, and its pid), for its table (``read_hosts``):
    meshrun knows its own host name only, which is not another node's
    ranks' host, nor tells apart hosts of one name. Written as their mesh
    is made, once a folder (whole or not at all)."""
    path = os.path.join(folder, _HOSTS)
    if os.path.exists(path):
        return
    part = f"{path}.{os.getpid()}.part"
    try:
        with open(part, "w", encoding="utf-8") as f:
            json.dump({"hosts": names, "pids": pids}, f)
        os.replace(part, path)
    except OSError:
        pass


def read_hosts(folder: str) -> dict[int, tuple[str, int]]:
    """(host, pid) of each rank, by rank, as its ranks told (``tell_hosts``;
    none in a job on one host, or where no mesh was made)."""
    try:
        with open(os.path.join(folder, _HOSTS), encoding="utf-8") as f:
            said = json.load(f)
        hosts, pids = said["hosts"], said["pids"]
        return {r: (str(h), int(p)) for r, (h, p) in enumerate(zip(hosts, pids, strict=True))}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _launchers_folder() -> str | None:
    """meshrun's run folder, where it says which of its ranks ended (not
    mesh.spawn's, nor under a launcher started inside a rank)."""
    from .env import by_mesh
    folder = os.environ.get("MESH_RUNTIME_DIR")
    return folder if folder and by_mesh() else None


def _ended_here(folder: str, me: int) -> tuple[int, str] | None:
    """(rank, how) of a rank other than ``me`` that its launcher says
    ended (``tell_ended``), if any."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("ended."))
    except OSError:
        return None
    for name in names:
        rank = name[len("ended."):]
        if rank.isdigit() and int(rank) != me:
            try:
                with open(os.path.join(folder, name)) as f:
                    return int(rank), f.read(200)
            except OSError:
                continue
    return None


def _host_of(rank: int, size: int) -> str:
    """The host id rank ``rank`` of a launcher here has (mesh.env.host_id,
    from the launcher's environment, which its ranks inherit); '' where
    MESH_HOST_ID is malformed (the rank itself says so)."""
    from .env import host_id
    try:
        return host_id(rank, size)
    except ValueError:
        return ""


class Teller:
    """A launcher's messages to the service: ``ended(rank, how)`` for each of
    its ranks that ended by itself (before it joined, or after: a rank's
    ``mesh.init()`` after a close waits for every rank again). Sends, never
    waits: the service may be gone already (the job over). ``attempt``: the
    try its ranks run (a service that runs the tries of every node hears
    only the word of its current try's)."""

    def __init__(self, addr: str, port: int, secret: str, size: int,
                 curve: bool = False, attempt: int = 0) -> None:
        self._where, self._size, self._try = f"tcp://{addr}:{port}", size, attempt
        self._secret, self._curve = secret, curve
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None

    def ended(self, rank: int, how: str, pid: int = 0) -> None:
        """Rank ``rank`` (process ``pid``) of this host ended (``how``)."""
        if self._sock is None:
            self._ctx = zmq.Context()
            self._sock = self._ctx.socket(zmq.DEALER)
            auth.make_client(self._sock, self._secret, self._curve)
            self._sock.connect(self._where)
        try:
            self._sock.send(msgpack.packb({"op": "ended", "rank": rank, "size": self._size,
                                          "how": how, "try": self._try, "pid": pid,
                                          "host": _host_of(rank, self._size)}),
                            zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        if self._sock is not None and self._ctx is not None:
            self._sock.close(linger=500)    # what it sent: a moment to go out
            self._ctx.term()
            self._sock = self._ctx = None
