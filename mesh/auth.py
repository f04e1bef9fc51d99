"""Job secret enforcement: a ZeroMQ ZAP handler that accepts only peers that
prove they hold the job's secret. A stranger's connection is refused during
the handshake, before any of its frames reach us, and counted.

Two mechanisms, chosen per job (every process of a job must agree):

- PLAIN (default): the secret itself is the password. Cheap, but the
  password and all traffic cross the network in clear: fine on one host or a
  trusted network.
- CURVE (``MESH_CURVE=1``, or ``meshrun --curve``): a Curve25519 key pair is
  derived from the secret, and every socket (rendezvous and workers) runs
  CurveZMQ with it. The secret never crosses the wire, a peer proves it holds
  it by its long-term key, and each connection is encrypted with its own
  session keys. For multi-host jobs on networks you do not trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import threading
from typing import Mapping

import zmq
from zmq.utils import z85

from .peer import config_flag, config_float

__all__ = ["Authenticator", "make_server", "make_client", "curve_wanted", "job_keys", "USER"]

USER = b"meshrun"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_log = logging.getLogger("mesh.auth")


def curve_wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the job runs CurveZMQ (MESH_CURVE=1)."""
    env = os.environ if env is None else env
    return config_flag("MESH_CURVE", False, env)


def job_keys(secret: str) -> tuple[bytes, bytes]:
    """The job's CURVE key pair (public, secret; Z85), derived from the job
    secret so that every process that holds it, and only those, can make it."""
    seed = hashlib.blake2b(secret.encode(), digest_size=32, person=b"meshrun-curve").digest()
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


class Authenticator:
    """One per ZeroMQ context; must be started before server sockets bind."""

    def __init__(self, ctx: zmq.Context, secret: str, curve: bool | None = None) -> None:
        self._ctx = ctx
        self._secret = secret.encode()
        self.curve = curve_wanted() if curve is None else curve
        self._client_key = z85.decode(job_keys(secret)[0]) if self.curve else b""
        self.accepted = 0
        self.refused = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(_ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()      # close() wakes the poll at once
        self._thread = threading.Thread(target=self._run, name="mesh-zap", daemon=True)
        self._thread.start()

    def _check(self, request: list[bytes]) -> bool:
        if len(request) < 7 or request[0] != b"1.0":
            return False
        mechanism = request[5]
        if self.curve:
            return mechanism == b"CURVE" and hmac.compare_digest(request[6], self._client_key)
        if mechanism != b"PLAIN" or len(request) < 8:
            return False
        user, password = request[6], request[7]
        return user == USER and hmac.compare_digest(password, self._secret)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if self._sock not in dict(poller.poll()):    # close() writes the pipe
                    continue
                request = self._sock.recv_multipart()
            except zmq.ZMQError:
                break
            ok = self._check(request)
            request_id = request[1] if len(request) > 1 else b""
            if ok:
                self.accepted += 1
                reply = [b"1.0", request_id, b"200", b"OK", USER, b""]
            else:
                self.refused += 1
                addr = request[3].decode(errors="replace") if len(request) > 3 else ""
                if self.refused & (self.refused - 1) == 0:   # 1, 2, 4, 8...: strangers retry
                    mech = request[5] if len(request) > 5 else b""
                    why = ("without the job's CurveZMQ key (another secret, or MESH_CURVE "
                           "off there)" if self.curve else
                           "without the job secret" if mech == b"PLAIN" else
                           f"that offers {mech.decode(errors='replace') or 'no'} credentials, "
                           f"not the job secret (MESH_CURVE on there?)")
                    _log.warning("refused a connection from %s %s (%d refused so far)",
                                 _where(addr), why, self.refused)
                reply = [b"1.0", request_id, b"400", b"bad credentials", b"", b""]
            try:
                self._sock.send_multipart(reply)
            except zmq.ZMQError:
                break
        self._sock.close(linger=0)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)


def _where(address: str) -> str:
    """Where a ZAP request's connection comes from: its IP address over
    tcp://; over ipc:// libzmq gives "localhost:UID:GID:PID", the
    connecting process's credentials, said here as such."""
    m = re.fullmatch(r"localhost:(\d+):\d+:(\d+)", address)
    if m:
        return f"process {m[2]} (user id {m[1]}) on this host"
    return address or "a local peer"


def make_server(sock: zmq.Socket, secret: str = "", curve: bool = False) -> None:
    """Require the job's credentials, checked by this context's Authenticator.
    A connection whose handshake has not finished after MESH_HANDSHAKE_TIMEOUT
    seconds (default 10) is dropped, and counted as refused: a peer's takes
    milliseconds, while a stranger's can stall (seen: a client of the NULL
    mechanism, now and then, for ZeroMQ's default 30 s)."""
    limit = config_float("MESH_HANDSHAKE_TIMEOUT", 10.0)
    if not limit > 0:
        raise ValueError(f"MESH_HANDSHAKE_TIMEOUT={limit}: must be > 0 seconds")
    sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, min(int(limit * 1000), 2**31 - 1)))  # (C int)
    # Over ipc:// only this user's processes may connect (the ranks of a job on one
    # host run as one user): another user's is closed as it is accepted. A rank's
    # socket in the abstract namespace (mesh.world._ipc_path) has no file permissions
    # to keep it out, and its connections held open used up a rank's open files
    # (ulimit -n, often 1024): libzmq aborts a process whose ipc:// accept fails so.
    with contextlib.suppress(AttributeError, zmq.ZMQError):    # (not POSIX, or no filter)
        sock.setsockopt(zmq.IPC_FILTER_UID, os.geteuid())
    if curve:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, job_keys(secret)[1])
    else:
        sock.setsockopt(zmq.PLAIN_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"meshrun")


def make_client(sock: zmq.Socket, secret: str, curve: bool = False) -> None:
    """Present the job's credentials when connecting."""
    if curve:
        public, secret_key = job_keys(secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    else:
        sock.setsockopt(zmq.PLAIN_USERNAME, USER)
        sock.setsockopt(zmq.PLAIN_PASSWORD, secret.encode())
