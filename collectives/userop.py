"""User-defined reduction ops (mpi4py's ``MPI.Op.Create``): ``Op(fn)`` as
the ``op=`` of all_reduce, reduce, reduce_scatter, reduce_scatter_v, scan
and exscan (collectives.api hands such a call here, whatever its array).

    op = collectives.Op(lambda a, b: a @ b)     # mats of shape (k, 2, 2): k products
    collectives.all_reduce(world, mats, op=op)  # rank 0's @ rank 1's @ ... @ rank n-1's

``fn(a, b)`` combines two operands of the call's array shape and dtype
(a reduce_scatter's: one rank's block of rows): it returns ``a (op) b``,
or writes it into ``b`` and returns None (MPI's ``inoutbuf``); a ``fn``
taking three arguments, as mpi4py's ``fn(inbuf, inoutbuf, datatype)``,
gets numpy arrays and their numpy dtype whatever the call's array (a
torch tensor's too: mpi4py's gets buffers), so ``np.frombuffer`` reads
them. ``a`` holds lower ranks than ``b``: every path combines in rank
order, so a non-commutative op (``commute=False``, the default as in
MPI) gives ``x0 (op) x1 (op) ... (op) x(n-1)``; and the same bits on
every rank (over sockets each pair is combined once; on the board every
rank combines the same operands in the same order).

These calls take their own paths (never the builtin reductions, which
combine chunks of an array in ufuncs; ``algorithm=`` and MESH_COLL_ALGO
do not apply). On a group whose ranks share a host (unless MESH_CMA=0),
the same-host board (collectives.shm.local_fold): each rank reads the
operands it needs out of its peers' memory and combines them itself, left
to right in rank order, then waits for every peer's stage. Otherwise over
point-to-point, each ending in a barrier:

    all_reduce          recursive doubling (collectives.host.small), the
                        whole array each round: log2(n) calls of fn
    reduce              a binomial tree of contiguous rank ranges into
                        rank 0 (then to the root)
    reduce_scatter(_v)  each rank's block sent to it; it combines the n
                        blocks in rank order
    scan, exscan        recursive doubling, the lower ranks' operand first

A numpy array's operands are numpy arrays (``a`` read-only), a torch
tensor's CPU tensors for ``fn(a, b)`` (bfloat16 widened to float32, as meshrun reduces it),
a device array's host copies. The op is in the call's fingerprint (its
name, and without one its function's code), so ranks passing other ops
raise MismatchError naming both; ``fn`` raising on a rank fails the call
on every rank, naming it.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from typing import Any, Callable, Sequence

import numpy as np

from mesh import Comm
from mesh.tensors import dtype_name, is_tensor

from . import debug
from .device.paths import simple
from .host import hier, paths_route
from .host.paths import _array, _counts_fp, _fp, _in_place, _root, _rows, _uneven
from .host.paths_reduce import scan_doubling
from .host.small import all_reduce_rd, barrier_dissemination
from .runner import Body, Ctx, abort_now, agreed, check_comm, start
from .shm import board
from .shm.local_fold import fold
from .tensors import run as _on_tensor

__all__ = ["Op", "all_reduce", "reduce", "reduce_scatter", "reduce_scatter_v", "scan"]


class Op:
    """A reduction given by a Python function (see the module): ``fn(a, b)``
    returns ``a (op) b`` or writes it into ``b``; ``fn(a, b, dtype)`` (three
    required arguments: mpi4py's form) writes it into ``b``. ``commute``:
    MPI's flag, part of the fingerprint (the order is rank order either
    way). ``name``: how the fingerprint and errors name it (default: the
    function's module and qualified name, and its code's digest, so that
    two lambdas differ; a name ranks on different Python versions agree on)."""

    __slots__ = ("fn", "commute", "name", "label", "_dtype_arg", "_torch")

    def __init__(self, fn: Callable[..., Any], commute: bool = False,
                 name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"collectives.Op takes a function fn(a, b), got "
                            f"{type(fn).__name__} {fn!r:.60}")
        if not isinstance(commute, bool):
            raise TypeError(f"collectives.Op: commute must be True or False, got {commute!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"collectives.Op: name must be a non-empty string, got {name!r}")
        self.fn, self.commute, self._torch = fn, commute, False
        self._dtype_arg = _required_args(fn) >= 3
        self.name = name or _qualified(fn)
        digest = "" if name else _code_digest(fn)
        self.label = (f"Op({self.name!r}" + (f" code {digest}" if digest else "")
                      + (", commute" if commute else "") + ")")

    def __repr__(self) -> str:
        return f"collectives.Op({self.name!r}, commute={self.commute})"

    def on_tensors(self) -> "Op":
        """This op for a torch tensor's call: its operands go to ``fn(a, b)``
        as CPU tensors (views of the call's buffers), to mpi4py's form
        ``fn(inbuf, inoutbuf, datatype)`` as numpy arrays, as ever."""
        twin = object.__new__(Op)
        for k in Op.__slots__:
            object.__setattr__(twin, k, getattr(self, k))
        twin._torch = True
        return twin


def _required_args(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` requires (2 where unknown)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    return sum(1 for p in params if p.default is p.empty and p.kind in (
        p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _qualified(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or \
        type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if isinstance(module, str) else str(name)


def _code_digest(fn: Callable[..., Any]) -> str:
    """A short digest of ``fn``'s code (its bytecode, names and constants,
    nested functions' too): alike in every process of one Python version."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    h = hashlib.blake2b(digest_size=4)

    def feed(c: Any) -> None:
        h.update(c.co_code)
        h.update(repr((c.co_names, c.co_varnames)).encode())
        for k in c.co_consts:
            if inspect.iscode(k):
                feed(k)
            else:   # (a frozenset's order is the process's hash seed's)
                h.update((repr(sorted(map(repr, k))) if isinstance(k, frozenset)
                          else repr(k)).encode())
    feed(code)
    return h.hexdigest()


class _Bound:
    """An Op in one call: ``apply(a, b)`` leaves ``a (op) b`` in ``b`` (an
    array of this call's, never the caller's) and returns ``b``, checking
    what ``fn`` gave; ``combine`` is ReduceOp's (the recursive doubling's),
    on flat buffers shown to ``fn`` as ``shape``. Errors name the call."""

    __slots__ = ("op", "where", "shape")

    def __init__(self, op: Op, ctx: Ctx, shape: tuple[int, ...] | None = None) -> None:
        self.op, self.where, self.shape = op, ctx.where(), shape

    def combine(self, dst: np.ndarray, src: np.ndarray, src_first: bool = False) -> None:
        a, b = (src, dst) if src_first else (dst, src)
        if self.shape is not None:
            a, b = a.reshape(self.shape), b.reshape(self.shape)
        self.apply(a, b)
        if not src_first:       # (the result is in src's buffer, a received one)
            dst[...] = src

    def apply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        op = self.op
        if b.size == 0:     # (an empty array, a block of no rows: nothing to combine)
            return b
        if op._torch and not op._dtype_arg:     # (mpi4py's form gets arrays, as buffers)
            import torch
            x: Any = torch.from_numpy(a if a.flags.writeable else a.copy())
            y: Any = torch.from_numpy(b)
        else:
            x = a.view()
            x.flags.writeable = False      # (MPI's invec: fn writes only its second operand)
            y = b
        try:
            res = op.fn(x, y, y.dtype) if op._dtype_arg else op.fn(x, y)
        except Exception as e:
            e.add_note(f"{self.where}: raised by the user op {op.label}; the call fails on "
                       f"every rank")
            raise
        if res is None or res is y:
            return b
        got: np.ndarray | None = None
        if is_tensor(res):
            try:
                got = res.detach().cpu().numpy()
            except (TypeError, RuntimeError):   # (a dtype numpy has not: bfloat16)
                got = None
        elif isinstance(res, (np.ndarray, np.generic, int, float, complex, bool)):
            got = np.asarray(res)
        if got is None or got.shape != b.shape or got.dtype != b.dtype:
            said = f"a {type(res).__name__}" if got is None else \
                f"{dtype_name(got.dtype)} of shape {got.shape}"
            raise TypeError(f"{self.where}: the user op {op.label} returned {said} for operands "
                            f"of {dtype_name(b.dtype)} of shape {b.shape}: fn(a, b) returns "
                            f"their combination, of their shape and dtype (or None, written "
                            f"into b)")
        b[...] = got
        return b


def _settled(ctx: Ctx) -> None:
    """The call's last step on every rank: a dissemination barrier on its
    tag, so that no rank returns before every rank's ``fn`` has returned
    (a rank whose last step was a combine raised, its peers waited in
    nothing of its: they returned a result and never heard of it)."""
    barrier_dissemination(ctx)


def _on_board(ctx: Ctx, name: str, path: str, nbytes: int) -> tuple[bytes, int] | None:
    """Whether this call runs on the same-host board (a group whose ranks
    may read each other's memory, unless MESH_CMA=0: collectives.shm.local_fold):
    the board's signature of its fingerprint, else None (over sockets, by
    ``path``: a group across hosts, or an op's name too long for the board's
    fingerprint); and MESH_COLL_DEBUG's line."""
    sig = None
    if board.available(ctx):
        try:
            sig = board.signature(ctx.fp)
        except ValueError:
            pass
    if debug.ON:
        debug.note(ctx.g, name, "user op, same-host board" if sig is not None
                   else f"user op, {path} over sockets", nbytes)
    return sig


def _met_on_hosts(ctx: Ctx, coll: str, buf: np.ndarray) -> Callable[[BaseException], None]:
    """Where ``ctx``'s group spans hosts in two levels (collectives.host.hier),
    as the peers' call would if it took a builtin op: post this call's
    fingerprint on this rank's host board at the number of that call's
    first host phase (shm.round.announce), so a host peer waiting there
    sees the mismatch itself (its short way, collectives.host.tiny, watches
    none of this call's messages: each waited for the other until the
    deadline); and returns what fails the phases the peers wait in when this
    call fails here (the host's, across hosts: hier.refuse), so that they
    raise its error (a MismatchError) instead of waiting."""
    topo = hier.topology(ctx.g)
    if topo is None:
        return lambda e: None
    fail = paths_route._skipped(ctx.g, coll, buf, 0, None)
    if topo.local.size > 1 and board.ready(topo.local):
        sub = hier.numbered(topo.local, ctx.tag, hier.FIRST)
        host = Ctx(sub, sub.collective_channel().next_tag(), dict(ctx.fp, phase="user op"),
                   ctx.tuning, f"{ctx.name} (user op)", ctx.timeout, ctx.deadline)
        try:
            board.announce(host)
        except ValueError:      # (a fingerprint too long for the board: not posted)
            pass
        except BaseException as e:
            fail(e, ctx.tag)
            raise
    return lambda e: fail(e, ctx.tag)


def _folded(ctx: Ctx, sig: tuple[bytes, int], mine: np.ndarray, ranks: Sequence[int],
            lo: int, hi: int, op: Op, shape: tuple[int, ...],
            out: np.ndarray | None = None) -> np.ndarray | None:
    """collectives.shm.local_fold.fold of items [lo, hi) of ``ranks``'
    ``mine`` (into ``out``), shown to ``fn`` as ``shape``; a ``fn`` that
    raises aborts the call on every member before this rank leaves the
    board's round."""
    bound = _Bound(op, ctx)

    def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        try:
            bound.apply(a.reshape(shape), b.reshape(shape))
        except BaseException as e:
            abort_now(ctx, e)
            raise
        return b
    return fold(ctx, mine, ranks, lo, hi, combine, sig, out)


def _fp_of(coll: str, arr: np.ndarray | None, op: Op, **kw: Any) -> dict:
    return _fp(coll, arr, op=op.label, **kw)


def _all_reduce(g: Comm, a: Any, op: Op, async_op: bool = False,
                timeout: float | None = None) -> Any:
    def prepare(t: Any) -> tuple[dict, Body]:
        arr = _array("all_reduce", a, writable=True)

        def body(ctx: Ctx, buf: np.ndarray) -> None:
            if ctx.g.size == 1:
                return
            sig = _on_board(ctx, "all_reduce", "recursive doubling", buf.nbytes)
            if sig is None:
                failed = _met_on_hosts(ctx, "all_reduce", buf)
                try:
                    all_reduce_rd(ctx, buf, _Bound(op, ctx, arr.shape))
                    _settled(ctx)
                except BaseException as e:
                    failed(e)
                    raise
                return
            _folded(ctx, sig, buf, range(ctx.g.size), 0, buf.size, op, arr.shape, buf)
        return _fp_of("all_reduce", arr, op), _in_place(arr, body)
    return start(g, "all_reduce", prepare, async_op, timeout)


def _ordered_to_zero(ctx: Ctx, mine: np.ndarray, op: _Bound) -> np.ndarray | None:
    """Binomial tree over contiguous rank ranges: in round d (1, 2, 4...)
    rank r (a multiple of 2d) takes r + d's range after its own. Rank 0's
    result: x0 (op) ... (op) x(n-1); None elsewhere. ``mine`` is only read."""
    n, r = ctx.g.size, ctx.g.rank
    acc, d = mine, 1
    while d < n:
        if r % (2 * d):
            ctx.send(acc, r - d)
            return None
        if r + d < n:
            acc = op.apply(acc, ctx.recv(r + d, out=np.empty_like(mine)))
        d *= 2
    return acc


def _reduce(g: Comm, a: Any, op: Op, root: int = 0, async_op: bool = False,
            timeout: float | None = None) -> Any:
    def prepare(t: Any) -> tuple[dict, Body]:
        arr = _array("reduce", a, writable=g.rank == root)
        r = _root(g, root)

        def tree(ctx: Ctx, buf: np.ndarray) -> None:
            got = _ordered_to_zero(ctx, buf.reshape(arr.shape), _Bound(op, ctx))
            if got is not None and r == 0:
                buf[...] = got.reshape(-1)
            elif got is not None:
                ctx.send(got, r)
            elif ctx.g.rank == r:
                ctx.recv(0, out=buf)
            _settled(ctx)      # (before agreed's watch: it would take the barrier's messages)

        def body(ctx: Ctx, buf: np.ndarray) -> None:
            if ctx.g.size == 1:
                return
            sig = _on_board(ctx, "reduce", "binomial tree", buf.nbytes)
            if sig is None:
                agreed(lambda c: tree(c, buf))(ctx)
                return
            ranks = range(ctx.g.size) if ctx.g.rank == r else range(0)
            _folded(ctx, sig, buf, ranks, 0, buf.size, op, arr.shape, buf)
        return _fp_of("reduce", arr, op, root=r), _in_place(arr, body, g.rank == r)
    return start(g, "reduce", prepare, async_op, timeout)


def _blocks(ctx: Ctx, name: str, arr: np.ndarray, counts: list[int], op: Op) -> np.ndarray:
    """This rank's block of a reduce_scatter: every rank's block ``rank``
    (``arr``: this rank's array, C-contiguous, only read, cut in blocks of
    ``counts`` rows in rank order), combined in rank order."""
    n, me = ctx.g.size, ctx.g.rank
    row, form = math.prod(arr.shape[1:]), arr.shape[1:]
    at = np.cumsum([0] + counts).tolist()
    lo, hi = at[me] * row, at[me + 1] * row
    if n > 1:
        sig = _on_board(ctx, name, "direct", arr.nbytes)
        if sig is not None:
            block = _folded(ctx, sig, arr.reshape(-1), range(n), lo, hi, op,
                            (counts[me],) + form)
            assert block is not None
            return block.reshape((counts[me],) + form)
    parts = [arr[at[j]:at[j + 1]] for j in range(n)]
    got = {j: ctx.irecv(j, np.empty_like(parts[me])) for j in range(n) if j != me}
    sent = [ctx.isend(parts[j], j) for j in range(n) if j != me]
    bound = _Bound(op, ctx)
    acc = None
    for j in range(n):
        part = got[j].wait() if j != me else parts[me].copy()
        acc = part if acc is None else bound.apply(acc, part)
    for req in sent:
        req.wait()
    if n > 1:
        _settled(ctx)
    assert acc is not None
    return acc


def _reduce_scatter(g: Comm, a: Any, op: Op, async_op: bool = False,
                    timeout: float | None = None) -> Any:
    def prepare(t: Any) -> tuple[dict, Body]:
        arr = np.ascontiguousarray(_array("reduce_scatter", a))
        _rows("reduce_scatter", arr, g.size)

        def body(ctx: Ctx) -> np.ndarray:
            m = arr.shape[0] // ctx.g.size
            return _blocks(ctx, "reduce_scatter", arr, [m] * ctx.g.size, op)
        return _fp_of("reduce_scatter", arr, op), body
    return start(g, "reduce_scatter", prepare, async_op, timeout)


def _reduce_scatter_v(g: Comm, a: Any, counts: list[int], op: Op, async_op: bool = False,
                      timeout: float | None = None,
                      check: Callable[[], Any] | None = None) -> Any:
    name = "reduce_scatter_v"

    def prepare(t: Any) -> tuple[dict, Body]:
        if check is not None:
            check()
        n = g.size
        arr = _uneven(name, a, counts, n, sum(counts) if len(counts) == n else None)[0]

        def body(ctx: Ctx) -> np.ndarray:
            return _blocks(ctx, name, arr, [int(k) for k in counts], op)
        return _fp(name, dtype=dtype_name(arr.dtype), row=list(arr.shape[1:]) or None,
                   counts=_counts_fp(list(counts)), op=op.label), body
    return start(g, name, prepare, async_op, timeout)


def _scan(g: Comm, a: Any, op: Op, async_op: bool = False, timeout: float | None = None,
          exclusive: bool = False) -> Any:
    name = "exscan" if exclusive else "scan"

    def prepare(t: Any) -> tuple[dict, Body]:
        arr = np.array(_array(name, a), order="C")      # (a copy: combined into)

        def body(ctx: Ctx) -> Any:
            if ctx.g.size == 1:
                return scan_doubling(ctx, arr, _Bound(op, ctx).apply, exclusive)
            sig = _on_board(ctx, name, "recursive doubling", arr.nbytes)
            if sig is None:
                out = scan_doubling(ctx, arr, _Bound(op, ctx).apply, exclusive)
                _settled(ctx)
                return out
            r = ctx.g.rank
            got = _folded(ctx, sig, arr.reshape(-1), range(r if exclusive else r + 1), 0,
                          arr.size, op, arr.shape)
            return None if got is None else got.reshape(arr.shape)
        return _fp_of(name, arr, op), body
    return start(g, name, prepare, async_op, timeout)


_staged_all_reduce = simple(_all_reduce, in_place=True)
_staged_reduce = simple(_reduce, in_place=True)
_staged_reduce_scatter = simple(_reduce_scatter, in_place=False)
_staged_reduce_scatter_v = simple(_reduce_scatter_v, in_place=False)
_staged_scan = simple(_scan, in_place=False)


def all_reduce(g: Comm, a: Any, op: Op, async_op: bool = False,
               timeout: float | None = None) -> Any:
    """collectives.all_reduce with a user op: in place, returns ``a``."""
    check_comm(g, "all_reduce")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(all_reduce, "all_reduce", g, a, op=op.on_tensors(),
                          async_op=async_op, timeout=timeout)
    return _staged_all_reduce(g, a, op, async_op=async_op, timeout=timeout)


def reduce(g: Comm, a: Any, op: Op, root: int = 0, async_op: bool = False,
           timeout: float | None = None) -> Any:
    """collectives.reduce with a user op: into the root's ``a``."""
    check_comm(g, "reduce")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(reduce, "reduce", g, a, op=op.on_tensors(),
                          root=root, async_op=async_op, timeout=timeout)
    return _staged_reduce(g, a, op, root, async_op=async_op, timeout=timeout)


def reduce_scatter(g: Comm, a: Any, op: Op, async_op: bool = False,
                   timeout: float | None = None) -> Any:
    """collectives.reduce_scatter with a user op: this rank's rows, new."""
    check_comm(g, "reduce_scatter")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(reduce_scatter, "reduce_scatter", g, a,
                          op=op.on_tensors(), async_op=async_op,
                          timeout=timeout)
    return _staged_reduce_scatter(g, a, op, async_op=async_op, timeout=timeout)


def reduce_scatter_v(g: Comm, a: Any, counts: Any, op: Op, async_op: bool = False,
                     timeout: float | None = None) -> Any:
    """collectives.reduce_scatter_v with a user op: counts[rank] rows, new."""
    check_comm(g, "reduce_scatter_v")
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(reduce_scatter_v, "reduce_scatter_v", g, a, counts=counts,
                          op=op.on_tensors(), async_op=async_op,
                          timeout=timeout)
    from .api import _counted       # (api imports this module)
    sizes, check = _counted(g, counts, "reduce_scatter_v")
    return _staged_reduce_scatter_v(g, a, sizes, op, async_op=async_op, timeout=timeout,
                                    check=check)


def scan(g: Comm, a: Any, op: Op, async_op: bool = False, timeout: float | None = None,
         exclusive: bool = False) -> Any:
    """collectives.scan (``exclusive``: exscan) with a user op."""
    name = "exscan" if exclusive else "scan"
    check_comm(g, name)
    if type(a) is not np.ndarray and is_tensor(a):
        return _on_tensor(scan, name, g, a, op=op.on_tensors(),
                          async_op=async_op, timeout=timeout, exclusive=exclusive)
    return _staged_scan(g, a, op, async_op=async_op, timeout=timeout, exclusive=exclusive)
