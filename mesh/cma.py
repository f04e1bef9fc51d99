"""Linux cross-memory attach: one process reads another's memory with
``process_vm_readv``, one kernel copy per byte (about 10 GB/s on a small
VM, against about 1 GB/s per direction for two busy ipc:// sockets).

Shared by the same-host point-to-point path (mesh.direct) and the same-host
collectives (collectives.shm). Where Yama restricts ptrace to ancestors,
each process opts out with ``allow_peers`` first; whether a peer may read
us is settled by it reading our ``token`` (pid and a random number)."""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
from typing import Any

import numpy as np

__all__ = ["read", "read_errno", "Reader", "Pieces", "allow_peers", "token"]


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc: Any = None
_PR_SET_PTRACER, _PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)
_token = np.zeros(2, np.int64)
_token_pid = 0
_token_lock = threading.Lock()


def _fresh_lock() -> None:      # a child forked while another thread held it
    global _token_lock
    _token_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock)


def _syscall() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.process_vm_readv
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                       ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_ssize_t
        _libc = fn
    return _libc


def read_errno(pid: int, addr: int, dst: np.ndarray) -> int:
    """Copy ``dst.nbytes`` bytes at ``addr`` in process ``pid`` into the
    C-contiguous ``dst``: 0 when done, else the errno (ESRCH: no such
    process; EFAULT: the range is not mapped there; EPERM: not allowed)."""
    fn = _syscall()
    base, total, done = dst.ctypes.data, dst.nbytes, 0
    while done < total:
        local = _IoVec(base + done, total - done)
        remote = _IoVec(addr + done, total - done)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno() if got < 0 else 0
            return err or errno.EFAULT
        done += got
    return 0


def read(pid: int, addr: int, dst: np.ndarray) -> None:
    """``read_errno``, raising OSError on failure."""
    err = read_errno(pid, addr, dst)
    if err:
        raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")


class Reader:
    """One fixed read, set up once and repeated (a board poll): the same
    remote range of ``pid`` into the same local array."""

    def __init__(self, pid: int, addr: int, dst: np.ndarray) -> None:
        self.fn = _syscall()
        self.pid, self.size = pid, dst.nbytes
        self._local = _IoVec(dst.ctypes.data, dst.nbytes)
        self._remote = _IoVec(addr, dst.nbytes)
        self.local, self.remote = ctypes.byref(self._local), ctypes.byref(self._remote)

    def __call__(self) -> int:
        """0 when the read went through, else the errno."""
        got = self.fn(self.pid, self.local, 1, self.remote, 1, 0)
        if got == self.size:
            return 0
        return ctypes.get_errno() if got < 0 else errno.EFAULT


class Pieces:
    """Reads of any range of ``pid``'s memory into any local address, set up
    once (a collective's loop over 256 KiB pieces: no iovec, byref or
    array made per read)."""

    def __init__(self, pid: int) -> None:
        self.fn, self.pid = _syscall(), pid
        self._local, self._remote = _IoVec(0, 0), _IoVec(0, 0)
        self.local, self.remote = ctypes.byref(self._local), ctypes.byref(self._remote)

    def __call__(self, addr: int, dst: int, nbytes: int) -> int:
        """Copy ``nbytes`` at ``addr`` there to ``dst`` here: 0, or the errno
        (as ``read_errno``)."""
        local, remote, done = self._local, self._remote, 0
        while done < nbytes:
            local.iov_base, remote.iov_base = dst + done, addr + done
            local.iov_len = remote.iov_len = nbytes - done
            got = self.fn(self.pid, self.local, 1, self.remote, 1, 0)
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else 0
                return err or errno.EFAULT
            done += got
        return 0


def token() -> np.ndarray:
    """This process's token, [pid, random 62 bits], for peers to read. Made
    once per process under a lock: a rank's progress thread (answering a
    peer's probe) and its main thread (sending its own) may both ask first,
    and a second draw after the first was sent made the peer's check fail."""
    global _token_pid
    with _token_lock:
        if _token_pid != os.getpid():
            _token[:] = [os.getpid(), secrets.randbits(62)]
            _token_pid = os.getpid()
    return _token


def allow_peers() -> None:
    """Under Yama's ptrace_scope 1 (Ubuntu's default) only an ancestor may
    read a process's memory; let any process of this user do it, as plain
    Linux does (Open MPI's shared-memory transport does the same)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)
    except (OSError, AttributeError):
        pass
