"""Communicators: the public point-to-point API over a Transport.

The world and every sub-group are the same class; a group's ranks are local
(0..size-1) and its traffic carries the group's id, so it can never be
confused with the world's or another group's. What its calls use lives
beside it, and is named here too:

    status.py      Status, PROC_NULL and the status a call on it gives
    request.py     Request, and those done as they are made
    completion.py  waitall, testall, waitany, waitsome, testany, testsome
    p2pargs.py     the checks of a call's tag, timeout and status=
    sendbuf.py     a send's object as host memory (bsend's copy, sendrecv's overlap)
"""
from __future__ import annotations

import hashlib
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import tensors
from .completion import _a, _listed, _who, testall, testany, testsome, waitall, waitany, waitsome
from .match import ANY, ANY_TAG, Pending, describe, got_fields
from .p2pargs import _check_status, _check_tag, _check_timeout, group_rank_hint
from .payload import delivered, out_unusable
from .request import Request, _answered, _Null, _sent
from .sendbuf import _copied, _overlap
from .status import ANY_SOURCE, PROC_NULL, Status, _copy_status, _is_null, _null
from .transport import Outgoing, Transport

if TYPE_CHECKING:
    from .channel import CollectiveChannel
    from .mprobe import Message
    from .persistent import Prequest
    from .window import Window

__all__ = ["Comm", "Request", "Status", "ANY", "ANY_SOURCE", "ANY_TAG", "PROC_NULL"]

_READ_HERE = (testall, testany, testsome, waitall, waitany, waitsome, _a, _answered, _listed,
              _who)
"""What other modules import from here besides __all__ (mesh's own
__init__, mesh.bench, mesh.persistent), where it was before it moved."""

_channel_lock = threading.Lock()


class Comm:
    """A communicator: ``rank``/``size`` within it, and send/recv by local rank."""

    def __init__(self, transport: Transport, ranks: Sequence[int], gid: int, name: str) -> None:
        self._t = transport
        self.ranks = list(ranks)
        self.size = len(self.ranks)
        self.rank = self.ranks.index(transport.rank)
        self.gid = gid
        self.name = name
        self._channel: CollectiveChannel | None = None
        self._children: dict[tuple[int, ...], int] = {}
        self._splits = 0     # split() calls made (collective: the same count on every rank)
        self._windows = 0    # window() calls made (collective too)
        transport.groups[gid] = (name, self.ranks)
        if gid:     # dropped, it is forgotten (Transport.sweep); the world lives as the mesh
            transport.sweep()
            transport.comms.setdefault(gid, weakref.WeakSet()).add(self)
            weakref.finalize(self, transport.dropped.append, gid)

    @property
    def timeout(self) -> float:
        """The default timeout (s) of this communicator's blocking operations."""
        return self._t.timeout

    def __repr__(self) -> str:
        return f"<Comm {self.name} rank {self.rank}/{self.size}>"

    # -- public point-to-point ---------------------------------------------------

    def send(self, obj: Any, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """Blocking send; returns when ``obj``'s buffer may be reused."""
        t = self._t
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "send")
        if type(dst) is int and 0 <= dst < self.size and type(tag) is int and 0 <= tag < ANY_TAG:
            if type(obj) is np.ndarray:
                if t.send_ring(self.ranks[dst], self.gid, tag, obj) is not None:
                    return
            elif self._ring_tensor(obj, dst, tag):
                return
        tag = _check_tag(tag, self, "send")
        if _is_null(dst):
            return
        wdst = self._world_rank(dst, "send")
        t.wait(t.isend(wdst, self.gid, tag, obj, None, self._desc("send to", dst, wdst, tag)),
               timeout, True)

    def recv(self, src: int = ANY, tag: int = 0, out: Any = None, timeout: float | None = None,
             status: Status | None = None) -> Any:
        """Blocking receive from ``src`` (or ANY) of ``tag`` (or ANY_TAG), into
        ``out=`` when given; ``status`` is filled in with what it matched."""
        t = self._t
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "recv")
        if status is not None:
            _check_status(status, self, "recv")
        if (type(src) is int and 0 <= src < self.size and type(tag) is int and 0 <= tag < ANY_TAG
                and (out is None or type(out) is np.ndarray)):     # (read-only, strided: below)
            got = t.recv_ring(self.gid, self.ranks[src], tag, out, timeout)
            if got is not None:        # from a same-host ring, by this thread
                if status is not None:
                    self._status(status, got[1])
                bits = got[1].device        # a torch tensor's message: a tensor (no out=)
                return got[0] if out is not None or not bits else delivered(got[0], bits)
        tag = _check_tag(tag, self, "recv", True)
        if _is_null(src):
            if status is not None:
                _null(status)
            return out
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc("recv from", src, wsrc, tag)
        if out is not None and not (type(out) is np.ndarray and (f := out.flags).c_contiguous
                                    and f.writeable):
            self._check_out(out, desc)
        req = t.irecv(self.gid, wsrc, tag, out, None, desc, False, True)
        value = t.wait(req, timeout)
        if status is not None:
            self._fill(status, req)
        return value

    def isend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        if type(dst) is int and 0 <= dst < self.size and type(tag) is int and 0 <= tag < ANY_TAG:
            if type(obj) is np.ndarray:
                if self._t.send_ring(self.ranks[dst], self.gid, tag, obj) is not None:
                    return _sent(self)      # done already
            elif self._ring_tensor(obj, dst, tag):
                return _sent(self)
        tag = _check_tag(tag, self, "isend")
        if _is_null(dst):
            return _sent(self)      # done: nothing to send
        return self._isend(obj, dst, tag)

    def ssend(self, obj: Any, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """MPI's synchronous send (mpi4py's ``ssend``/``Ssend``): ``send``,
        returning only once a receive of ``dst`` (a ``recv``, ``irecv``,
        ``mprobe``, from ``dst``'s rank or ANY_SOURCE) has taken the
        message; its buffer may be reused then too. MeshTimeoutError after
        ``timeout`` (the message stays for a later receive), LostPeerError
        when ``dst`` leaves without taking it."""
        tag = _check_tag(tag, self, "ssend")
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "ssend")
        if _is_null(dst):
            return
        t = self._t
        t.wait(self._issend(obj, dst, tag, "ssend"), timeout, True)

    def issend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        """``ssend`` as a request (MPI's Issend): its ``wait``, ``test`` and
        ``done`` complete once a receive of ``dst`` has taken the message."""
        tag = _check_tag(tag, self, "issend")
        if _is_null(dst):
            return _sent(self)
        return Request(self, self._issend(obj, dst, tag, "issend"))

    def _issend(self, obj: Any, dst: int, tag: int, op: str) -> Outgoing:
        wdst = self._world_rank(dst, op)
        desc = self._desc(f"{op} to", dst, wdst, tag)
        if type(obj) is np.ndarray and wdst != self._t.rank:
            out = self._t.ssend_ring(wdst, self.gid, tag, obj, desc)
            if out is not None:
                return out
        return self._t.isend(wdst, self.gid, tag, obj, None, desc, True)

    def bsend(self, obj: Any, dst: int, tag: int = 0) -> None:
        """MPI's buffered send (mpi4py's ``bsend``/``Bsend``): returns at once,
        the message copied (no ``Attach_buffer``: each copy is its own, held
        until it has gone); sent as ``isend`` sends the copy. An error of
        the send (a lost peer) is not reported: use ``ibsend`` to see it."""
        self._ibsend(obj, dst, tag, "bsend")

    def ibsend(self, obj: Any, dst: int, tag: int = 0) -> Request:
        """``bsend`` giving the copy's ``isend`` request: ``obj`` may be
        reused at once; its ``wait`` returns once the copy is handed over
        (or raises the send's error)."""
        return self._ibsend(obj, dst, tag, "ibsend")

    def _ibsend(self, obj: Any, dst: int, tag: int, op: str) -> Request:
        tag = _check_tag(tag, self, op)
        if _is_null(dst):
            return _sent(self)
        return self._isend_as(_copied(obj), dst, tag, op)

    def _isend_as(self, obj: Any, dst: int, tag: int, op: str) -> Request:
        """``isend`` (its tag checked already) whose errors name ``op`` (a
        bad rank, and its wait's: ``ibsend to rank 1 ...``)."""
        wdst = self._world_rank(dst, op)
        dst = int(dst)
        if type(obj) is np.ndarray:
            if self._t.send_ring(wdst, self.gid, tag, obj) is not None:
                return _sent(self)      # done already
        elif self._ring_tensor(obj, dst, tag):
            return _sent(self)
        desc = self._desc(f"{op} to", dst, wdst, tag)
        return Request(self, self._t.isend(wdst, self.gid, tag, obj, None, desc))

    rsend = send
    """MPI's ready send (mpi4py's ``rsend``/``Rsend``, which requires the
    receive to be posted already): ``send``, which is correct for it."""
    irsend = isend
    """MPI's Irsend: ``isend``."""

    def _ring_tensor(self, obj: Any, dst: int, tag: int) -> bool:
        """Send a plain CPU torch tensor by ring (as a numpy array is, its
        header flagged so the receiver gets a tensor); False: the usual way."""
        if not tensors.is_tensor(obj):
            return False
        view = tensors.plain_view(obj)
        return view is not None and self._t.send_ring(self.ranks[dst], self.gid, tag, view[0],
                                                      view[1]) is not None

    def irecv(self, src: int = ANY, tag: int = 0, out: Any = None) -> Request:
        tag = _check_tag(tag, self, "irecv", True)
        if _is_null(src):
            return _Null(self, out)
        return Request(self, self._post_recv(src, tag, out, "recv from"))

    def send_init(self, buf: Any, dst: int, tag: int = 0) -> "Prequest":
        """MPI's Send_init (mpi4py's ``comm.Send_init``): a persistent send,
        set up once; each ``start()`` (or ``mesh.startall``) sends ``buf``'s
        contents as they are then, as ``isend`` (mesh.persistent)."""
        from .persistent import send_init
        return send_init(self, buf, dst, tag)

    def ssend_init(self, buf: Any, dst: int, tag: int = 0) -> "Prequest":
        """MPI's Ssend_init: ``send_init`` whose each start sends as
        ``issend``: its wait completes once a receive of ``dst`` took it."""
        from .persistent import send_init
        return send_init(self, buf, dst, tag, "ssend_init")

    def bsend_init(self, buf: Any, dst: int, tag: int = 0) -> "Prequest":
        """MPI's Bsend_init: ``send_init`` whose each start sends as
        ``ibsend``: ``buf`` copied then, free again at once."""
        from .persistent import send_init
        return send_init(self, buf, dst, tag, "bsend_init")

    def rsend_init(self, buf: Any, dst: int, tag: int = 0) -> "Prequest":
        """MPI's Rsend_init: ``send_init`` (each start an ``irsend``, which
        is ``isend``)."""
        from .persistent import send_init
        return send_init(self, buf, dst, tag, "rsend_init")

    def recv_init(self, src: int = ANY, tag: int = 0, out: Any = None) -> "Prequest":
        """MPI's Recv_init: a persistent receive into ``out=``; each
        ``start()`` posts it as ``irecv`` (mesh.persistent)."""
        from .persistent import recv_init
        return recv_init(self, src, tag, out)

    def sendrecv(self, obj: Any, dst: int, src: int = ANY, sendtag: int = 0,
                 recvtag: int = ANY_TAG, out: Any = None, timeout: float | None = None,
                 status: Status | None = None) -> Any:
        """Send ``obj`` to ``dst`` and receive from ``src``, as one call: the
        receive is posted before the send, so ranks exchanging with each
        other never deadlock. ``timeout`` bounds the whole call; if the send
        fails, the receive is withdrawn (unless a message matched it)."""
        sendtag = _check_tag(sendtag, self, "sendrecv")
        recvtag = _check_tag(recvtag, self, "sendrecv", True)
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "sendrecv")
        if status is not None:
            _check_status(status, self, "sendrecv")
        t = self._t
        began = time.monotonic()
        if out is not None and _overlap(obj, out):
            # MPI's Sendrecv_replace: the send reads obj after the receive is posted (a
            # ring copy, the peer's direct read, zero-copy socket frames), and the message
            # coming into out= meanwhile would be sent back in part; send a copy instead
            obj = obj.detach().clone() if tensors.is_tensor(obj) else obj.copy()
        req = None if _is_null(src) else self._post_recv(src, recvtag, out, "sendrecv from")
        try:
            if not _is_null(dst):
                wdst = self._world_rank(dst, "sendrecv")
                t.wait(t.isend(wdst, self.gid, sendtag, obj, None,
                               self._desc("sendrecv to", dst, wdst, sendtag)), timeout, True)
        except BaseException:
            if req is not None:
                t.cancel(req)
            raise
        if req is None:     # (from PROC_NULL: out=, untouched, or None)
            if status is not None:
                _null(status)
            return out
        value = t.wait(req, t.timeout if timeout is None else timeout, start=began)
        if status is not None:
            self._fill(status, req)
        return value

    def probe(self, src: int = ANY, tag: int = ANY_TAG, timeout: float | None = None) -> Status:
        """Block until a message from ``src`` with ``tag`` is waiting, and say
        what it is, without receiving it: the next receive that matches it
        (and has a fitting ``out=``, or none) takes it."""
        tag = _check_tag(tag, self, "probe", True)
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "probe")
        if _is_null(src):
            return _null(Status())
        wsrc = ANY if src == ANY else self._world_rank(src, "probe")
        req = self._t.irecv(self.gid, wsrc, tag, None, None, self._desc("probe", src, wsrc, tag),
                            True, True)
        self._t.wait(req, timeout)
        return self._fill(Status(), req)

    def iprobe(self, src: int = ANY, tag: int = ANY_TAG) -> Status | None:
        """probe without blocking: the waiting message's Status, or None
        (what has come is read first, as MPI_Iprobe does)."""
        tag = _check_tag(tag, self, "iprobe", True)
        if _is_null(src):
            return _null(Status())      # (as MPI_Iprobe: flag true, the null status)
        wsrc = ANY if src == ANY else self._world_rank(src, "iprobe")
        got = self._t.iprobe(self.gid, wsrc, tag)
        if got is None:
            self._t.poke()      # (what has come is read here, as MPI_Iprobe does)
            # (from a lost source, or ANY with a member lost: LostPeerError, as probe's)
            got = self._t.iprobe(self.gid, wsrc, tag,
                                 lambda: self._desc("iprobe", src, wsrc, tag))
        return None if got is None else self._status(Status(), got)

    def mprobe(self, src: int = ANY, tag: int = ANY_TAG, timeout: float | None = None,
               status: Status | None = None) -> "Message":
        """MPI's Mprobe (mpi4py's ``comm.mprobe``): block until a message from
        ``src`` with ``tag`` comes and take it out of matching: no other
        receive or probe sees it; the returned Message says what it is and
        its ``recv(out=None)``/``irecv`` receives it (mesh.mprobe)."""
        from .mprobe import Message, mprobe
        tag = _check_tag(tag, self, "mprobe", True)
        if timeout is not None:
            timeout = _check_timeout(timeout, self, "mprobe")
        if status is not None:
            _check_status(status, self, "mprobe")
        msg = Message(self, None, None) if _is_null(src) else mprobe(self, src, tag, timeout)
        if status is not None:
            _copy_status(msg.status, status)
        return msg

    def improbe(self, src: int = ANY, tag: int = ANY_TAG,
                status: Status | None = None) -> "Message | None":
        """mprobe without blocking (MPI's Improbe): the waiting message,
        taken out of matching, or None (what has come is read first)."""
        from .mprobe import Message, improbe
        tag = _check_tag(tag, self, "improbe", True)
        if status is not None:
            _check_status(status, self, "improbe")
        msg = Message(self, None, None) if _is_null(src) else improbe(self, src, tag)
        if msg is not None and status is not None:
            _copy_status(msg.status, status)
        return msg

    def window(self, buf: Any, timeout: float | None = None) -> "Window":
        """MPI's Win_create, collective: every rank exposes ``buf`` (a
        writable C-contiguous numpy array or CPU torch tensor; one dtype on
        every rank, sizes may differ) to one-sided ``put``, ``get`` and
        ``accumulate`` by element offset, synchronized by ``fence`` or
        ``lock``/``unlock``; ``free()`` (or a ``with`` block) ends it
        (mesh.window)."""
        from .window import Window
        return Window(self, buf, timeout)

    def shared_window(self, count: int, dtype: Any = np.float64,
                      timeout: float | None = None) -> "Window":
        """MPI's Win_allocate_shared, collective over ranks of one host
        (else MeshError on every rank): ``count`` zeroed elements of
        ``dtype`` on this rank (counts may differ, not dtypes) in memory
        every rank maps (mesh.shared); ``win.array`` is this rank's part,
        ``win.shared(r)`` rank ``r``'s, a numpy view to load and store, and
        the window's one-sided calls work on it as on ``window``'s."""
        from .shared import allocate
        from .window import Window
        seg = allocate(self, count, dtype, timeout)
        return Window(self, seg.views[self.rank], timeout, shared=seg)

    # -- internal: the collectives' side (mesh.channel) -----------------------------

    def collective_channel(self) -> CollectiveChannel:
        """The interface collectives use (mesh.channel): collective tags,
        fingerprinted messages, aborts. One per communicator, made on first use."""
        if self._channel is None:
            with _channel_lock:
                if self._channel is None:
                    from .channel import CollectiveChannel
                    self._channel = CollectiveChannel(self, self._t)
        return self._channel

    def _isend(self, obj: Any, dst: int, tag: int, fp: Any = None,
               what: str | None = None) -> Request:
        wdst = self._world_rank(dst, "send")
        desc = self._desc("send to", dst, wdst, tag, what)
        return Request(self, self._t.isend(wdst, self.gid, tag, obj, fp, desc))

    def _irecv(self, src: int, tag: int, out: np.ndarray | None = None, fp: Any = None,
               what: str | None = None) -> Request:
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc("recv from", src, wsrc, tag, what)
        return Request(self, self._t.irecv(self.gid, wsrc, tag, out, fp, desc))

    def _post_recv(self, src: int, tag: int, out: Any, verb: str) -> Pending:
        """Post a user receive (``out=`` checked first, see _check_out)."""
        wsrc = ANY if src == ANY else self._world_rank(src, "recv")
        desc = self._desc(verb, src, wsrc, tag)
        if out is not None:
            self._check_out(out, desc)
        return self._t.irecv(self.gid, wsrc, tag, out, None, desc)

    def _check_out(self, out: Any, desc: tuple) -> None:
        """An ``out=`` no message could be written into (not an array,
        read-only, not C-contiguous) raises ValueError before anything is posted."""
        why = out_unusable(out)
        if why:
            raise ValueError(f"rank {self._t.rank}: {describe(desc)}: {why}")

    def _fill(self, status: Status, item: Pending) -> Status:
        return self._status(status, item.got) if item.got is not None else status

    def _status(self, status: Status, got: Any) -> Status:
        src, status.tag, status.nbytes, status.dtype, status.shape = got_fields(got)
        status.source = src if self.gid == 0 else self.ranks.index(src)
        return status

    def _desc(self, verb: str, peer: int, world: int, tag: int, what: str | None = None) -> tuple:
        """The parts of an operation's description (mesh.match.describe):
        the peer's world rank too in a sub-group, and the collective
        ``what`` a message belongs to."""
        if what is not None:
            return (verb, peer, tag, self.name, world if self.gid else None, what)
        if self.gid:
            return (verb, peer, tag, self.name, world)
        return (verb, peer, tag, self.name)

    def _world_rank(self, r: int, op: str) -> int:
        if type(r) is int and 0 <= r < self.size:
            return self.ranks[r]
        way = "from" if op in ("recv", "probe", "iprobe", "recv_init") else "to"
        if not isinstance(r, (int, np.integer)) or isinstance(r, (bool, np.bool_)):
            raise ValueError(f"rank {self._t.rank}: {op} {way} rank {r!r}: a rank is an int "
                             f"(group {self.name} has ranks 0..{self.size - 1}), not "
                             f"{type(r).__name__}")
        if not 0 <= r < self.size:
            hint = group_rank_hint(self, r)
            raise ValueError(f"rank {self._t.rank}: {op} {way} rank {r!r}: group {self.name} "
                             f"has ranks 0..{self.size - 1}{f' ({hint})' if hint else ''}")
        return self.ranks[int(r)]

    # -- groups ------------------------------------------------------------------

    def group(self, ranks: Sequence[int]) -> "Comm | None":
        """A sub-communicator of ``ranks`` (local to this one). Members get it,
        other ranks get None. Members must create groups of the same ranks in
        the same order, so the group's id agrees without any message."""
        try:
            given: list[Any] = list(ranks)
        except TypeError:
            given = [None]          # (one rank alone is not a list of them: refused below)
        if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in given):
            raise TypeError(f"rank {self._t.rank}: group({ranks!r}) of group {self.name}: ranks "
                            f"is a list of ints in 0..{self.size - 1}")   # (int() takes 1.7, "1")
        ranks = [int(r) for r in given]
        if len(set(ranks)) != len(ranks) or not all(0 <= r < self.size for r in ranks):
            raise ValueError(f"rank {self._t.rank}: group({ranks}) of group {self.name}: ranks "
                             f"must be distinct and in 0..{self.size - 1}")
        key = tuple(ranks)
        n = self._children.get(key, 0)
        self._children[key] = n + 1
        if self.rank not in ranks:
            return None
        return self._sub((key, n), ranks, f"{self.name}/{list(ranks)}" + (f"#{n}" if n else ""))

    def dup(self) -> "Comm":
        """MPI's ``Comm_dup``: a communicator of the same ranks, numbered
        alike, whose traffic (messages and collectives) never mixes with
        this one's or another dup's. It is ``group(range(size))`` (no
        message): every rank calls it, in the same order among its groups
        of this communicator."""
        sub = self.group(range(self.size))
        assert sub is not None
        return sub

    def split(self, color: int | None, key: int = 0,
              timeout: float | None = None) -> "Comm | None":
        """MPI's ``Comm_split``, a collective over this communicator: the
        ranks that pass the same ``color`` (an int >= 0) form one new
        communicator, ranked by ``key`` and then by their rank here; a rank
        that passes None joins none and gets None. Every rank of this one
        calls it, in the same order among its collectives (the colors and
        keys travel by one all_gather, which raises as collectives do: a
        lost peer, a timeout, a rank that called another collective)."""
        def whole(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) \
                and bool(-2**62 <= v < 2**62)
        bad = None
        for what, ok, v in (("color", color is None or whole(color) and color >= 0, color),
                            ("key", whole(key), key)):
            if not ok and bad is None:
                bad = ValueError(f"rank {self._t.rank}: split on group {self.name}: {what} must "
                                 f"be an int{' >= 0 or None' if what == 'color' else ''}, "
                                 f"got {v!r}")
        import collectives     # the exchange is a collective (mesh does not import them)
        # (a rank's bad color goes as -2, so that every rank raises, none waits for it)
        mine = np.array([-2, 0] if bad else [-1 if color is None else color, key], np.int64)
        table = collectives.all_gather(self, mine, timeout=timeout)
        n = self._splits
        self._splits += 1
        if bad is not None:
            raise bad
        wrong = [self.ranks[r] for r, (c, _) in enumerate(table) if c == -2]   # (world ranks)
        if wrong:
            raise ValueError(f"rank {self._t.rank}: split on group {self.name}: the color or key "
                             f"of rank(s) {wrong} is not valid (see their error)")
        if color is None:
            return None
        ranks = [r for _, r in sorted((int(k), r) for r, (c, k) in enumerate(table) if c == color)]
        return self._sub(("split", n, int(color)), ranks, f"{self.name}/split{n}:{color}")

    def split_host(self, key: int = 0, timeout: float | None = None) -> "Comm":
        """The ranks of this communicator that share this rank's host, as
        MPI's ``Comm_split_type(COMM_TYPE_SHARED)``: ``split`` with the
        host (the rendezvous table's host id) as the color; collective."""
        hosts = [self._t.hosts[w] for w in self.ranks]
        color = hosts.index(hosts[self.rank])      # each host by its first rank here
        sub = self.split(color, key, timeout)
        assert sub is not None
        return sub

    def _sub(self, ident: tuple, ranks: Sequence[int], name: str) -> "Comm":
        """The sub-communicator of local ``ranks`` named ``ident``, which its
        members agree on: its id hashes this one's and ``ident``."""
        digest = hashlib.blake2b(repr((self.gid, *ident)).encode(), digest_size=8).digest()
        gid = int.from_bytes(digest, "little") >> 1 or 1
        return Comm(self._t, [self.ranks[r] for r in ranks], gid, name)
