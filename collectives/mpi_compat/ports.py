"""MPI's ports (mpi4py's ``MPI.Open_port``, ``MPI.Close_port``,
``Comm.Accept``, ``Comm.Connect``): two running jobs joined in a bridge
mesh of both communicators' ranks (the accepting side's first), as Spawn
joins its parents and children (spawn.py)::

    accepting root: Open_port -> "meshrun-port:tcp://127.0.0.1:PORT:SECRET"
    connecting root --{size}--> the port's socket (its secret: a stranger is refused)
    accepting root  <-- the bridge's rendezvous service (a fresh secret), its size
    both sides: bcast to their ranks, join the bridge (spawn.join)

``Accept`` and ``Connect`` are collective over their communicators; the
Intercomm's ``Disconnect`` closes the bridge on both sides. The port's
socket listens on 127.0.0.1: the two jobs share a host. Every wait is
bounded by MESH_TIMEOUT (300 s)."""
from __future__ import annotations

import secrets
import time
from typing import Any

import msgpack
import zmq

from mesh import auth
from mesh.errors import MeshTimeoutError
from mesh.peer import config_float
from mesh.rdvserver import RendezvousServer

from .comm import Comm
from .inter import Intercomm
from .spawn import join

__all__ = ["open_port", "close_port", "accept", "connect", "PREFIX"]

PREFIX = "meshrun-port:"
_ports: dict[str, tuple[zmq.Context, zmq.Socket, auth.Authenticator]] = {}


def _no_info(info: Any, what: str) -> None:
    if info is not None and (not hasattr(info, "items") or dict(info.items())):
        raise NotImplementedError(f"collectives.MPI {what}: info keys are not honoured "
                                  f"(MPI.INFO_NULL only), got {info!r:.60}")


def open_port(info: Any = None) -> str:
    """A port name: a socket of this process's (port 0, a fresh secret),
    which Accept listens on until Close_port."""
    _no_info(info, "Open_port")
    secret, curve = secrets.token_hex(16), auth.curve_wanted()
    ctx = zmq.Context()
    guard = auth.Authenticator(ctx, secret, curve)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 4096)
    auth.make_server(sock, secret, curve)
    sock.bind("tcp://127.0.0.1:0")
    name = f"{PREFIX}{sock.getsockopt_string(zmq.LAST_ENDPOINT)}:{secret}"
    _ports[name] = (ctx, sock, guard)
    return name


def close_port(port_name: str) -> None:
    got = _ports.pop(port_name, None)
    if got is None:
        raise ValueError(f"collectives.MPI Close_port: {port_name!r:.80} is no port this "
                         f"process opened (or it is closed already)")
    ctx, sock, guard = got
    sock.close(0)
    guard.close()
    ctx.term()


def _wait(sock: zmq.Socket, what: str, port_name: str) -> list[bytes]:
    wait = config_float("MESH_TIMEOUT", 300.0, above=0)
    if not sock.poll(int(wait * 1000)):
        raise MeshTimeoutError(f"collectives.MPI {what}: no word on port {port_name!r:.80} "
                               f"in {wait:g} s (MESH_TIMEOUT)")
    return sock.recv_multipart()


def _agree(comm: Comm, what: str, said: Any, root: int) -> dict[str, Any]:
    said = comm.bcast(said, root=root)
    if "error" in said:
        kind = {"ValueError": ValueError, "TypeError": TypeError,
                "NotImplementedError": NotImplementedError,
                "MeshTimeoutError": MeshTimeoutError}.get(said["error"], RuntimeError)
        raise kind(f"rank {comm.rank}: collectives.MPI {what}: {said['text']}")
    return dict(said)


def _check(comm: Comm, what: str, root: int) -> None:
    if isinstance(comm, Intercomm) or not comm:
        raise TypeError(f"collectives.MPI {what}: over an intracommunicator (not COMM_NULL, "
                        f"not an intercommunicator)")
    if not 0 <= int(root) < comm.size:
        raise ValueError(f"rank {comm.rank}: collectives.MPI {what}: root {root} out of range "
                         f"(0..{comm.size - 1})")


def accept(comm: Comm, port_name: str, info: Any = None, root: int = 0) -> Intercomm:
    """MPI_Comm_accept, collective over ``comm``: the root waits on its port
    for one Connect, starts the bridge's service and answers with it."""
    _check(comm, "Accept", root)
    said: Any = None
    server = None
    if comm.rank == root:
        try:
            _no_info(info, "Accept")
            got = _ports.get(port_name)
            if got is None:
                raise ValueError(f"{port_name!r:.80} is no port this process opened "
                                 f"(MPI.Open_port)")
            ident, word = _wait(got[1], "Accept", port_name)[:2]
            n = msgpack.unpackb(word).get("size")
            if type(n) is not int or n < 1:
                raise ValueError(f"a malformed Connect on port {port_name!r:.80}")
            secret = secrets.token_hex(16)
            server = RendezvousServer(comm.size + n, secret, curve=auth.curve_wanted()).start()
            got[1].send_multipart([ident, msgpack.packb({"port": server.port, "secret": secret,
                                                        "size": comm.size})])
            said = {"port": server.port, "secret": secret, "n": n}
        except (ValueError, TypeError, NotImplementedError, MeshTimeoutError, zmq.ZMQError) as e:
            if server is not None:
                server.close()
            said = {"error": type(e).__name__, "text": str(e)}
    said = _agree(comm, "Accept", said, root)
    return join("Accept", comm.rank, comm.size + said["n"], said["port"], said["secret"], 0,
                comm.size, server)


def connect(comm: Comm, port_name: str, info: Any = None, root: int = 0) -> Intercomm:
    """MPI_Comm_connect, collective over ``comm``: the root tells the port
    this side's size and gets the bridge's service back."""
    _check(comm, "Connect", root)
    said: Any = None
    if comm.rank == root:
        ctx = zmq.Context()
        try:
            _no_info(info, "Connect")
            if not isinstance(port_name, str) or not port_name.startswith(PREFIX):
                raise ValueError(f"{port_name!r:.80} is no port name (MPI.Open_port's)")
            endpoint, _, secret = port_name[len(PREFIX):].rpartition(":")
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            auth.make_client(sock, secret, auth.curve_wanted())
            sock.connect(endpoint)
            sock.send(msgpack.packb({"size": comm.size, "at": time.time()}))
            answer = msgpack.unpackb(_wait(sock, "Connect", port_name)[0])
            said = {"port": answer["port"], "secret": answer["secret"], "n": answer["size"]}
            sock.close(0)
        except (ValueError, TypeError, NotImplementedError, MeshTimeoutError, zmq.ZMQError) as e:
            said = {"error": type(e).__name__, "text": str(e)}
        finally:
            ctx.destroy(0)
    said = _agree(comm, "Connect", said, root)
    n = said["n"]
    return join("Connect", n + comm.rank, n + comm.size, said["port"], said["secret"], n,
                comm.size)
