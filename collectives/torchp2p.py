"""The "meshrun" ProcessGroup's (collectives.torchpg) point-to-point: send
and recv of a tensor over the group's mesh, and the Work over the mesh
request they return.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.futures import Future

import mesh
from mesh import MeshTimeoutError
from mesh import tensors as _tensors

from .runner import named
from .torchargs import _Members, _torch_words, _write
from .torchwork import _FutureWork, _Work


class _PointToPoint(_Members):
    """ProcessGroupMeshrun's send, recv and recv_anysource."""

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int) -> dist.Work:
        return _P2PWork(self.comm.isend(tensors[0], dstRank, tag), None, tensors, self.timeout,
                        sent=f"{named(self.comm, self.comm.rank)}: send to rank {dstRank} "
                             f"(tag {tag}, group {self.comm.name})")

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int) -> dist.Work:
        return self._recv(tensors[0], srcRank, tag)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> dist.Work:
        return self._recv(tensors[0], mesh.ANY, tag)

    def _recv(self, t: torch.Tensor, src: int, tag: int) -> dist.Work:
        """Straight into ``t`` where a message can go (dense, contiguous);
        else into a contiguous tensor of ``t``'s dtype and shape, copied
        into ``t``: the message is checked against it as against ``t``
        (OutMismatchError naming the rank, the peer and the tag; the message
        stays queued). A fresh tensor of the message's own was cast into a
        strided ``t`` (float32 1.5 received as 1 into an int32 column) or
        failed in torch's reshape, naming no one, the message lost."""
        if not _tensors.out_unusable(t):
            return _P2PWork(self.comm.irecv(src, tag, out=t), None, [t], self.timeout)
        if t.layout is not torch.strided:
            return _P2PWork(self.comm.irecv(src, tag), lambda v: _write(t, v), [t],
                            self.timeout)
        buf = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return _P2PWork(self.comm.irecv(src, tag, out=buf), lambda _: _write(t, buf), [t],
                        self.timeout)


class _P2PWork(_Work):
    """A torch Work over a mesh request; ``finish(value)`` copies a received
    value where the tensor could not take it directly. ``wait()`` without a
    timeout waits the process group's (``limit``), as gloo's does."""

    def __init__(self, req: Any, finish: Callable[[Any], None] | None,
                 tensors: list[torch.Tensor], limit: float, sent: str = "") -> None:
        super().__init__()
        self._req, self._finish, self._tensors, self._limit = req, finish, tensors, limit
        self._sent = sent       # a send's description ('': a receive)
        self._lock = threading.Lock()
        self._done: _FutureWork | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        secs = timeout.total_seconds() if timeout else 0.0
        try:
            value = self._req.wait(secs if secs > 0 else self._limit)
        except MeshTimeoutError as e:
            if secs <= 0:
                _torch_words(e, self._limit)
            raise
        with self._lock:
            fn, self._finish = self._finish, None
        if fn is not None:
            fn(value)
        return True

    def is_completed(self) -> bool:
        """Whether the transfer is done (what has come is read: a polling
        loop); a receive's tensor holds the message once it says so: one
        received through a buffer of its own (a strided tensor) is copied
        in here, where only ``wait()`` copied it (gloo refuses one)."""
        if not self._req.get_status():
            return False
        if self._finish is not None:
            self.exception()        # (the copy, or the error that wait() raises)
        return True

    def is_success(self) -> bool:
        return bool(self._req.get_status()) and self.exception() is None

    def exception(self) -> BaseException | None:
        """The transfer's error once it is done (a receive that timed out, a
        peer lost), as the collectives' Work gives it; None while it goes on
        or when it succeeded (torch's own said None even after a failure)."""
        if not self._req.done():
            return None
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the error is the answer
            return e
        return None

    def source_rank(self) -> int:
        """The sender's rank in the receive's group. A send's Work has none:
        it said "the receive has not matched a message yet", of a send."""
        if self._sent:
            raise RuntimeError(f"source_rank: {self._sent}: only the Work of a recv or a "
                               f"recv from any source has a source rank (this is a send's)")
        status = self._req.status      # the sender's rank in the receive's group
        if status is None:
            raise RuntimeError("source_rank: the receive has not matched a message yet")
        return int(status.source)

    def _source_rank(self) -> int:
        return self.source_rank()

    def result(self) -> list[torch.Tensor]:
        return self._tensors

    def get_future(self) -> Future:
        """A future completed once the transfer is done (a thread waits for it;
        none where it is done already: the future is then complete on return,
        as a finished collective's is, for ``work.wait(); get_future().value()``)."""
        with self._lock:
            done, made = self._done, self._done is None
            if done is None:
                done = self._done = _FutureWork()
        if made and self._req.done():
            self._complete(done)
        elif made:
            threading.Thread(target=self._complete, args=(done,),
                             name="meshrun-p2p-future", daemon=True).start()
        return done.get_future()

    def _complete(self, done: _FutureWork) -> None:
        try:
            self.wait()
        except BaseException as e:
            done.finish(None, e)
            return
        done.finish(self._tensors, None)
