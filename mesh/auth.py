"""Job secret enforcement: a ZeroMQ ZAP handler that accepts only peers that
present the job's secret through the PLAIN mechanism. A stranger's connection
is refused during the handshake, before any of its frames reach us, and counted."""
from __future__ import annotations

import hmac
import logging
import threading

import zmq

__all__ = ["Authenticator", "make_server", "make_client", "USER"]

USER = b"meshrun"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_log = logging.getLogger("mesh.auth")


class Authenticator:
    """One per ZeroMQ context; must be started before server sockets bind."""

    def __init__(self, ctx: zmq.Context, secret: str) -> None:
        self._ctx = ctx
        self._secret = secret.encode()
        self.accepted = 0
        self.refused = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(_ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-zap", daemon=True)
        self._thread.start()

    def _check(self, request: list[bytes]) -> bool:
        if len(request) < 6 or request[0] != b"1.0":
            return False
        mechanism = request[5]
        if mechanism != b"PLAIN" or len(request) < 8:
            return False
        user, password = request[6], request[7]
        return user == USER and hmac.compare_digest(password, self._secret)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(100):
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
                addr = request[3].decode(errors="replace") if len(request) > 3 else "?"
                _log.warning("refused a connection from %s without the job secret "
                             "(%d refused so far)", addr or "a local peer", self.refused)
                reply = [b"1.0", request_id, b"400", b"bad credentials", b"", b""]
            try:
                self._sock.send_multipart(reply)
            except zmq.ZMQError:
                break
        self._sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def make_server(sock: zmq.Socket) -> None:
    """Require PLAIN credentials checked by this context's Authenticator."""
    sock.setsockopt(zmq.PLAIN_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"meshrun")


def make_client(sock: zmq.Socket, secret: str) -> None:
    sock.setsockopt(zmq.PLAIN_USERNAME, USER)
    sock.setsockopt(zmq.PLAIN_PASSWORD, secret.encode())
