"""This process's listening socket for plain TCP streams beside ZeroMQ:
the ring's links between hosts (collectives.host.stream, .link) and
point-to-point arrays between hosts (mesh.streams) connect to it. One per
process, on any address, made at the first use. A connection says who it is
in a hello (a magic, the listener's token, which only the mesh's
authenticated messages carry, and a key: a group id, a tag and the sender's
world rank); a stranger without the token, a garbage hello or one not whole
in time is closed and counted (``strangers``).
"""
from __future__ import annotations

import os
import secrets
import select
import socket
import struct
import threading
import time

__all__ = ["Listener", "listener", "the_listener", "reset", "HELLO", "MAGIC"]

HELLO = struct.Struct("<4s16sqqq")      # magic, token, group id, tag, world rank
MAGIC = b"MSTR"
_POLL_S = 0.05                          # the most a look waits for a connection or hello
_HELLO_S = 2.0
_SHAKING_MAX = 64                       # accepted connections whose hellos are read at once
_STALE_S = 120.0                        # accepted, never claimed: closed after this


def reset(conn: socket.socket) -> None:
    """Close without TIME_WAIT (a reset): only once nothing more is owed."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


class Listener:
    """This process's listening socket; connections accepted and their hellos
    read by whichever caller is waiting for one, kept by (group, tag, rank)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.token = secrets.token_bytes(16)
        self.lock = threading.Lock()
        self.ready: dict[tuple[int, int, int], tuple[socket.socket, float]] = {}
        # accepted, their hellos not whole yet: what came of each, and when accepted
        self.shaking: dict[socket.socket, tuple[bytes, float]] = {}
        self.strangers = 0

    def take(self, key: tuple[int, int, int], until: float) -> socket.socket | None:
        """The connection whose hello named ``key``, waiting up to ``until``
        (monotonic) for it; None if it has not come by then."""
        while True:
            with self.lock:
                got = self.ready.pop(key, None)
                if got is not None:
                    return got[0]
                self._look()
                got = self.ready.pop(key, None)
                if got is not None:
                    return got[0]
            if time.monotonic() >= until:
                return None

    def _look(self) -> None:
        """Accept the connections waiting and read what came of their hellos,
        waiting _POLL_S at most, and on no one connection: read in turn, a
        stranger that said nothing, or its hello a byte a second, held the
        peer's connection queued behind it past the call's deadline. A hello
        not whole _HELLO_S after its accept is a stranger's."""
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        for conn in self.shaking:
            poll.register(conn, select.POLLIN)
        heard = {fd for fd, _ in poll.poll(int(_POLL_S * 1000))}
        now = time.monotonic()
        if self.sock.fileno() in heard:
            for _ in range(_SHAKING_MAX):
                try:
                    conn, _ = self.sock.accept()
                except OSError:     # (none left; or out of descriptors: the next look)
                    break
                conn.setblocking(False)
                self.shaking[conn] = (b"", now)
                if len(self.shaking) > _SHAKING_MAX:     # the oldest: a stranger's, surely
                    self._refuse(next(iter(self.shaking)))
        for conn, (got, since) in list(self.shaking.items()):
            if conn.fileno() in heard:
                try:
                    more = conn.recv(HELLO.size - len(got))
                except (BlockingIOError, InterruptedError):
                    more = None
                except OSError:
                    more = b""
                if more == b"":         # closed before its hello was whole
                    self._refuse(conn)
                    continue
                got += more or b""
                self.shaking[conn] = (got, since)
            if len(got) == HELLO.size:
                del self.shaking[conn]
                self._hello(conn, got)
            elif now - since > _HELLO_S:
                self._refuse(conn)
        if not heard:
            self._prune()

    def _hello(self, conn: socket.socket, hello: bytes) -> None:
        magic, token, gid, tag, src = HELLO.unpack(hello)
        if magic != MAGIC or not secrets.compare_digest(token, self.token):
            self._refuse(conn)
            return
        conn.settimeout(_HELLO_S)
        old = self.ready.pop((gid, tag, src), None)
        if old is not None:
            reset(old[0])
        self.ready[(gid, tag, src)] = (conn, time.monotonic())

    def _refuse(self, conn: socket.socket) -> None:
        self.shaking.pop(conn, None)
        self.strangers += 1
        conn.close()

    def _prune(self) -> None:
        now = time.monotonic()
        for key, (conn, t) in list(self.ready.items()):
            if now - t > _STALE_S:
                del self.ready[key]
                reset(conn)


_listener: Listener | None = None
_listener_lock = threading.Lock()


def listener() -> Listener | None:
    """This process's listener, once a stream was asked for (its
    ``strangers``: connections refused for a wrong hello)."""
    return _listener


def the_listener() -> Listener:
    global _listener
    with _listener_lock:
        if _listener is None:
            _listener = Listener()
        return _listener


def _forget_in_child() -> None:
    """In a child forked from this process the listener is the parent's
    (its listening socket and token): the child makes its own at its first
    use. Shared (the ranks of a job that mesh.spawn forked all shared it), a
    connection meant for one process was accepted by whichever looked first,
    never claimed there, and the stream it was for failed, its sender lost.
    The child's copies of the parent's descriptors are closed, not shut
    down: the parent's stay open."""
    global _listener, _listener_lock
    old, _listener, _listener_lock = _listener, None, threading.Lock()
    if old is not None:
        for conn in [old.sock, *old.shaking, *(c for c, _ in old.ready.values())]:
            conn.close()


os.register_at_fork(after_in_child=_forget_in_child)
