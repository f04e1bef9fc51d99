"""Gradient all-reduce for a training loop: fusion buckets launched as soon
as backward has produced their gradients, so communication overlaps the
rest of backward.

    reducer = collectives.GradReducer(world, grads)    # once: plans buckets
    for step in ...:
        ... backward, last layer first; after each gradient is final:
        reducer.ready(i)            # the bucket holding grads[i] may launch
        reducer.wait()              # grads now hold the average over ranks

Buckets follow backward's order (the last gradients first), hold one dtype
each and about ``bucket_bytes``; their fusion buffers are allocated once
and reused every step.

With torch, pass the parameters, as torch's DDP holds them:
``GradReducer(world, [p for p in model.parameters() if p.requires_grad])``.
torch replaces gradient tensors (its default ``optimizer.zero_grad()`` sets
``.grad`` to None and the next backward makes a new one), so the reducer
reads each parameter's current ``.grad`` when its bucket launches (zeros
where it is None; for max, min and prod the op's identity, so that they
are over the ranks that have one), and ``wait()`` raises, naming the gradient, if ``.grad``
was replaced between the launch and the copy back. A torch gradient tensor
(or a numpy view of one) is refused: the reducer would go on reducing the
old tensor after torch replaced it, and the replicas would drift apart.

Gradients are all torch tensors on one device (parameters' ``.grad``, or
the tensors given to ``all_reduce_grads``), all host (numpy) arrays or all
device arrays of one GPU (CuPy, or anything with ``__cuda_array_interface__``
or DLPack, reduced in place through a CuPy view). torch buckets are tensors
on the gradients' device, reduced through collectives.tensors; bfloat16
gradients share float32 buckets (widened on the way in, rounded once on the
way back). Device buckets
live on that GPU and go through collectives.all_reduce's device paths; the
copies into and out of them run on the current stream, so, as for every
device collective, ``wait()``'s results are ready for work queued after it
on that stream.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
import weakref
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mesh import Comm, device, tensors

from .ops import resolve
from .runner import abandon, check_comm, named
from .userop import Op
from .api import all_gather, all_gather_object, all_reduce   # host arrays or device ones

__all__ = ["DEFAULT_BUCKET_BYTES", "bucket_plan", "GradReducer", "all_reduce_grads"]

DEFAULT_BUCKET_BYTES = 25 << 20


def bucket_plan(sizes: Sequence[int], dtypes: Sequence[Any],
                bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Indices of the gradients in each bucket, in launch order: walking the
    list backwards, a bucket closes once it holds ``bucket_bytes`` or the
    next gradient has another dtype. ``sizes`` are in bytes.

    >>> bucket_plan([4, 4, 4, 8], ["f4", "f4", "f4", "f8"], 8)
    [[3], [2, 1], [0]]
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    plan: list[list[int]] = []
    held, dtype = 0, None
    for i in reversed(range(len(sizes))):
        dt = np.dtype(dtypes[i])
        if not plan or held >= bucket_bytes or dt != dtype:
            plan.append([])
            held, dtype = 0, dt
        plan[-1].append(i)
        held += sizes[i]
    return plan


def _is_param(x: Any) -> bool:
    """A parameter whose ``.grad`` the reducer follows (a torch Parameter)."""
    return not isinstance(x, np.ndarray) and getattr(x, "requires_grad", False) is True \
        and hasattr(x, "grad")


def _is_frozen(x: Any) -> bool:
    """A torch Parameter that does not require grad: its values are no
    gradient (all_reduce_grads averaged the weights themselves)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.Parameter) and not x.requires_grad


def _torch_held(a: Any) -> bool:
    """A torch tensor, or a numpy array viewing one's memory."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return type(a).__module__.split(".")[0] == "torch"


# group -> the gradient layouts (digests) its ranks were found to agree on, each with
# what a rank missing one of its gradients needs to plan the buckets the peers launch:
# every gradient's (shape, dtype name), size in bytes and dtype as reduced
_Layout = tuple[list[tuple[tuple[int, ...], str]], list[int], list[Any]]
_agreed: "weakref.WeakKeyDictionary[Comm, dict[bytes, _Layout]]" = weakref.WeakKeyDictionary()


def _named_spec(a: Any) -> tuple[tuple[int, ...], str]:
    """An array's shape and dtype name, alike for torch, numpy and CuPy."""
    return tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", "")).removeprefix("torch.")


class _Bucket:
    """Gradients ``members``, fused at ``offsets`` of ``buf``; with
    ``flags``, one element more for each, past them (from ``flags``):
    1 where the member had a gradient at launch, 0 where it had none."""

    __slots__ = ("members", "buf", "offsets", "pending", "work", "flags")

    def __init__(self, members: list[int], sizes: Sequence[int], empty: Any,
                 flags: bool = False) -> None:
        self.members = members
        self.offsets = []
        off = 0
        for i in members:
            self.offsets.append(off)
            off += sizes[i]
        self.flags = off if flags else -1
        self.buf = empty(off + (len(members) if flags else 0), members[0])
        self.pending = set(members)
        self.work: Any = None


class GradReducer:
    """All-reduce a fixed list of gradient arrays (or the current gradients
    of a fixed list of parameters), bucket by bucket, as they become ready;
    ``wait()`` leaves every gradient averaged (``op="avg"``, the default) or
    summed (``op="sum"``) over the group, in place. A user op
    (``collectives.Op``) gets a bucket at a time: the gradients of one
    dtype joined flat, so it must combine elementwise; a parameter without
    a ``.grad`` is refused then (the op has no identity to stand for it).
    ``timeout`` bounds each bucket's all_reduce (default: the group's)."""

    _refuse_torch = True      # all_reduce_grads' one-shot reducer takes them
    _called = "GradReducer"   # what errors name

    def __init__(self, g: Comm, grads: Iterable[Any], bucket_bytes: int =
                 DEFAULT_BUCKET_BYTES, op: str | Op = "avg",
                 timeout: float | None = None) -> None:
        check_comm(g, self._called)
        self.g = g
        self.timeout = timeout
        self._bucket_bytes = bucket_bytes
        self._me = f"rank {g.ranks[g.rank]}: {self._called} on group {g.name}"
        items = list(grads)
        kinds = [_is_param(x) for x in items]
        self.params: list[Any] | None = items if items and all(kinds) else None
        frozen = next((i for i, x in enumerate(items) if _is_frozen(x)), None)
        if frozen is not None:      # (frozen ones alone were taken as gradient arrays)
            raise TypeError(f"{self._me}: parameter {frozen} does not require grad (a frozen "
                            f"one): pass the trained ones, [p for p in model.parameters() "
                            f"if p.requires_grad]")
        if any(kinds) and self.params is None:
            raise TypeError(f"{self._me}: gradient {kinds.index(False)} is not a parameter "
                            f"and gradient {kinds.index(True)} is: a GradReducer takes all "
                            f"parameters (it follows their .grad) or all gradient arrays")
        self._held: list[Any] = [None] * len(items)
        self._made: list[bool] = [False] * len(items)    # .grad was None: zeros made here
        # (parameters: their own tensors stand in for the gradients they will have)
        self.grads = [p.detach() for p in items] if self.params else items
        if self.params is None and self._refuse_torch:
            for i, a in enumerate(self.grads):
                if _torch_held(a):
                    raise TypeError(self._torch_message(i))
        self.torch = bool(self.grads) and tensors.is_tensor(self.grads[0])
        self.on_device = not self.torch and bool(self.grads) and device.is_device(self.grads[0])
        for i, a in enumerate(self.grads):
            self._check(i, a)
        # What the buckets copy from and back into: the arrays themselves,
        # detached tensors, or CuPy views of device arrays (sharing their memory).
        self._views = [self._view(a) for a in self.grads]
        self._specs = [(tuple(v.shape), v.dtype) for v in self._views]
        self._gpu: Any = None
        self._device: Any = None
        if self.torch:
            where = {v.device for v in self._views}
            if len(where) != 1:
                raise ValueError(f"{self._me}: gradients live on {sorted(map(str, where))}: a "
                                 f"GradReducer's gradients share one device")
            dev = self._device = where.pop()
            wide = [tensors.BFLOAT16_WIDE if v.dtype == self._bf16 else
                    tensors.check(v, f"{self._me}: gradient {i}")
                    for i, v in enumerate(self._views)]
            sizes = [v.numel() for v in self._views]
            nbytes = [v.numel() * v.element_size() for v in self._views]

            def empty(n: int, first: int) -> Any:
                dt = self._views[first].dtype
                return _torch().empty(n, dtype=_torch().float32 if dt == self._bf16 else dt,
                                     device=dev)
        else:
            xp: Any = np
            if self.on_device:
                xp = device.cupy()
                ids = {v.device.id for v in self._views}
                if len(ids) != 1:
                    raise ValueError(f"{self._me}: gradients live on GPUs {sorted(ids)}: a "
                                     f"GradReducer's gradients share one GPU")
                self._gpu = ids.pop()
            wide = [v.dtype for v in self._views]
            sizes = [v.size for v in self._views]
            nbytes = [v.nbytes for v in self._views]

            def empty(n: int, first: int) -> Any:
                return xp.empty(n, self._views[first].dtype)
        try:
            for dt in wide:
                if not isinstance(op, Op):
                    resolve(op, dt)
            plan = bucket_plan(nbytes, wide, bucket_bytes)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{self._me}: {e}") from None
        self.op = op
        self._sizes = sizes
        self._plan_from: _Layout = ([_named_spec(v) for v in self._views], nbytes, wide)
        # Parameters' buckets of floating gradients carry whether each had a
        # gradient: one no rank had stays None, as in DDP (a user op's, which
        # would combine the flags too, have none: a missing .grad is refused).
        flags = self.params is not None and not isinstance(op, Op)
        with self._on_gpu():
            self.buckets = [_Bucket(m, sizes, empty, flags and _floating(wide[m[0]]))
                            for m in plan]
        self._where = {i: b for b in self.buckets for i in b.members}
        self._planned = list(self.buckets)     # (reorder's numbering: the plan's order)
        # every rank must reduce the same gradients in the same order: checked once
        self._layout = hashlib.blake2b(repr(self._specs).encode(), digest_size=16).digest()
        self._versions = [0] * len(items)   # torch: each .grad's version as its bucket took it
        self._left: list[tuple[int, int]] | None = None    # what the last wait() left
        # an observer of each bucket's phases (collectives.horovod's timeline):
        # "launch", "copied" (into the bucket), "sent" (its call made: b.work),
        # "out" (the call waited for), "back" (copied into the gradients)
        self._trace: Callable[[str, _Bucket], None] | None = None

    @property
    def _bf16(self) -> Any:
        return _torch().bfloat16

    def _check(self, i: int, a: Any) -> None:
        """Gradient ``i`` is of the reducer's kind: torch, device or host."""
        if a is None:       # (not a kind of its own: [p.grad for p in params], one unused)
            err = TypeError(f"{self._me}: gradient {i} is None (a parameter without a "
                            f".grad: unused in this step's forward?); pass the parameters "
                            f"themselves, [p for p in model.parameters() if "
                            f"p.requires_grad]: a missing .grad is then reduced as zeros "
                            f"(left out of max, min and prod), and stays None where no rank "
                            f"has one")
            # Unused here only, maybe: the ranks that have it would wait in their calls
            # for this one (to their timeout), or meet its next calls there.
            for _ in range(self._peers_calls()):
                abandon(self.g, str(err))
            raise err
        if self.torch:
            if not tensors.is_tensor(a):
                raise TypeError(f"{self._me}: gradient {i} is a {type(a).__name__} and "
                                f"gradient 0 a torch tensor: a GradReducer takes all torch, "
                                f"all host (numpy) or all device gradients")
            if a.layout != _torch().strided:
                raise TypeError(f"{self._me}: gradient {i} is a {a.layout} tensor: a "
                                f"GradReducer reduces dense gradients (nn.Embedding("
                                f"sparse=True) and EmbeddingBag's make sparse ones: leave "
                                f"sparse=False)")
            return
        if tensors.is_tensor(a) or device.is_device(a) != self.on_device:
            raise TypeError(f"{self._me}: gradient {i} is a "
                            f"{'host' if self.on_device else 'device'} array and gradient 0 "
                            f"is not: a GradReducer takes all torch, all host (numpy) or all "
                            f"device gradients")
        if not self.on_device and (not isinstance(a, np.ndarray) or not a.flags.writeable):
            raise TypeError(f"{self._me}: gradient {i} is not a writable numpy array (got "
                            f"{type(a).__name__})")

    def _peers_calls(self) -> int:
        """How many calls the ranks that have every gradient make (a gradient
        is None here): one per bucket of an agreed layout the others fit
        (the most, where several do), else one, the layout check."""
        mine = [None if a is None else _named_spec(a) for a in self.grads]
        fits = [len(bucket_plan(nbytes, wide, self._bucket_bytes))
                for specs, nbytes, wide in _agreed.get(self.g, {}).values()
                if self._bucket_bytes >= 1 and len(specs) == len(mine) and
                all(m is None or m == s for m, s in zip(mine, specs))]
        return max(fits, default=1)

    def _view(self, a: Any) -> Any:
        if self.torch:
            return a.detach()
        return device.as_cupy(a) if self.on_device else a

    def _torch_message(self, i: int) -> str:
        return (f"{self._me}: gradient {i} is a torch tensor or a numpy view of one: torch "
                f"replaces gradient tensors (optimizer.zero_grad() sets .grad to None), and a "
                f"GradReducer would go on reducing the old one; pass the parameters "
                f"instead: GradReducer(g, [p for p in model.parameters() if p.requires_grad])")

    def _current(self, i: int) -> Any:
        """Parameter i's current gradient tensor; when None, one made of the
        op's identity: zeros for avg and sum (as DDP counts an unused
        parameter's), -inf for max, inf for min, ones for prod, so that max,
        min and prod are over the ranks that have one (noted: wait() sets it
        back to None when no rank had one)."""
        assert self.params is not None
        p = self.params[i]
        self._made[i] = p.grad is None
        if p.grad is None:
            op = self.op
            if isinstance(op, Op):
                raise TypeError(f"{self._me}: parameter {i} has no .grad (unused in this "
                                f"step's forward?): the user op {op.label} has no "
                                f"identity to reduce in its place; give it one (p.grad = "
                                f"torch.zeros_like(p)) or reduce with a builtin op")
            p.grad = p.detach().new_full(p.shape, _IDENTITY.get(op, 0.0))
        t = self._held[i] = p.grad
        return t

    def _replace(self, i: int, grad: Any) -> None:
        self._check(i, grad)
        (shape, dtype), new = self._specs[i], self._view(grad)
        if tuple(new.shape) != shape or new.dtype != dtype or \
                (self.torch and new.device != self._device):
            raise ValueError(f"{self._me}: gradient {i} was {dtype}{shape}, now {new.dtype}"
                             f"{tuple(new.shape)}")
        self.grads[i], self._views[i] = grad, new

    def _on_gpu(self) -> Any:
        return device.cupy().cuda.Device(self._gpu) if self.on_device else \
            contextlib.nullcontext()

    def ready(self, i: int, grad: Any = None) -> None:
        """Gradient ``i`` is final (``grad`` replaces the array registered for
        it: same shape and dtype, and host or device as the others). Buckets
        launch in plan order (the same on every rank, as collectives must),
        each once all its gradients are ready. A reducer of parameters reads
        their ``.grad`` itself: no ``grad`` then."""
        if type(i) is not int and not isinstance(i, np.integer) or i not in self._where:
            raise ValueError(f"{self._me}: ready({i!r}): the gradients are numbered 0.."
                             f"{len(self.grads) - 1}, as given")
        if grad is not None:
            if self.params is not None:
                raise TypeError(f"{self._me}: gradient {i}: this GradReducer follows its "
                                f"parameters' .grad; ready() takes no gradient")
            if self._refuse_torch and _torch_held(grad):
                raise TypeError(self._torch_message(i))
            self._replace(i, grad)
        self._where[i].pending.discard(i)
        for b in self.buckets:
            if b.pending:
                break
            if b.work is None:
                self._launch(b)

    def reorder(self, order: Sequence[int]) -> None:
        """From the next step on, the buckets launch in ``order``: indices
        of the plan's buckets (``bucket_plan``'s order), each once; alike on
        every rank, as collectives must (an order the ranks agreed on, such
        as the order their gradients became ready in). The buckets hold the
        same gradients at the same offsets: the results are the same bits.
        Between steps only (no bucket launched)."""
        got = [int(k) for k in order]
        if sorted(got) != list(range(len(self._planned))):
            raise ValueError(f"{self._me}: reorder({list(order)!r}): each of the buckets 0.."
                             f"{len(self._planned) - 1} once")
        if any(b.work is not None for b in self.buckets):
            raise RuntimeError(f"{self._me}: reorder() while buckets are launched: call it "
                               f"after wait(), before the next step's ready()")
        self.buckets = [self._planned[k] for k in got]

    def _agree(self) -> None:
        """Once per group and layout: the ranks pass gradients of the same
        shapes and dtypes in the same order (one small all_gather; the
        buckets' fingerprints alone miss a reordering of equal sizes),
        else a ValueError on every rank naming the first that differs."""
        agreed = _agreed.setdefault(self.g, {})
        if self._layout in agreed:
            return
        mine = np.frombuffer(self._layout, np.uint64)
        table = all_gather(self.g, mine, timeout=self.timeout).reshape(self.g.size, -1)
        if (table == table[0]).all():
            agreed[self._layout] = self._plan_from
            return
        specs = all_gather_object(self.g, self._plan_from[0], timeout=self.timeout)
        other = next(r for r in range(self.g.size) if specs[r] != specs[0])
        a, b = specs[0], specs[other]
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        said = (lambda s, k: f"{s[k][1]}{tuple(s[k][0])}" if k < len(s) else "none")
        raise ValueError(f"{self._me}: the ranks' gradients differ: gradient {i} is "
                         f"{said(a, i)} on {named(self.g, 0)} and {said(b, i)} on "
                         f"{named(self.g, other)} "
                         f"({len(a)} and {len(b)} gradients): every rank passes the same "
                         f"parameters in the same order (model.parameters() of one model)")

    def _launch(self, b: _Bucket) -> None:
        if b is self.buckets[0]:       # a step's first launch
            self._agree()
            if self.params is not None:
                self._since_last_wait()
        if self.params is not None:
            try:
                for i in b.members:
                    self._replace(i, self._current(i))
                    if self.torch:
                        self._versions[i] = self._held[i]._version
            except (TypeError, ValueError) as e:
                self._fail_from(b, e)
                raise
        trace = self._trace
        if trace is not None:
            trace("launch", b)
        with self._on_gpu():
            for i, off in zip(b.members, b.offsets):
                b.buf[off:off + self._sizes[i]] = self._views[i].reshape(-1)
            if b.flags >= 0:        # (parameters: torch tensors)
                had = 0 if self.op in _NONE_IS_ONE else 1   # (reduces to 1 - had where none)
                b.buf[b.flags:].copy_(_torch().tensor([1 - had if self._made[i] else had
                                                       for i in b.members]))
            if trace is not None:
                trace("copied", b)
            b.work = all_reduce(self.g, b.buf, op=self.op, async_op=True, timeout=self.timeout)
        if trace is not None:
            trace("sent", b)

    def _fail_from(self, b: _Bucket, e: BaseException) -> None:
        """A ``.grad`` this rank cannot reduce (a sparse one, another shape),
        found as bucket ``b`` launches: the peers' calls for ``b`` and the
        buckets after it fail naming it (the ranks agreed on the layout, so
        they make as many), where they waited for this rank to their
        timeout; here those buckets raise it at ``wait()``."""
        for later in self.buckets[self.buckets.index(b):]:
            if later.work is None:
                abandon(self.g, str(e))
                later.work = _Raise(e)

    def _since_last_wait(self) -> None:
        """A step's first launch: some gradient must have changed since the
        last wait() left them (else a second wait() would reduce the
        averages again: op="sum" would multiply them)."""
        left, self._left = self._left, None
        if left is None or not self.torch:
            return
        for p, (was, version) in zip(self.params or (), left):   # (the first change ends it)
            g = p.grad
            if (0 if g is None else id(g)) != was or (g is not None and g._version != version):
                return
        raise RuntimeError(f"{self._me}: no gradient changed since the last wait(): a "
                           f"second wait() without a backward in between would reduce the "
                           f"averages again")

    def wait(self) -> None:
        """Launch what is left (in bucket order), wait for every bucket,
        copy the results into the gradients; ready for the next step.
        Raises, after all that, when a parameter's ``.grad`` was replaced
        or written (another backward accumulated into it) after its bucket
        took it: it holds no average. A wait that fails (a timeout, a lost
        peer) leaves the reducer ready for the next step, as the group is
        (``_abandon``)."""
        try:
            self._wait()
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """After a failed wait: each bucket's call waited out (its error
        dropped: the first is raised) and forgotten, so that the next step
        launches every bucket anew (it re-raised the old error for good)."""
        for b in self.buckets:
            if b.work is not None:
                try:
                    b.work.wait()
                except Exception:
                    pass
            b.work = None
            b.pending = set(b.members)
        if self.params is not None:
            for i in range(len(self.params)):
                self.grads[i] = self._views[i] = self._held[i] = None

    def _wait(self) -> None:
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        written = [] if not (self.params is not None and self.torch) else [
            i for i, p in enumerate(self.params)
            if p.grad is self._held[i] and p.grad._version != self._versions[i]]
        unused = []
        trace = self._trace
        with self._on_gpu():
            for b in self.buckets:
                b.work.wait()
                b.work = None
                b.pending = set(b.members)
                if trace is not None:
                    trace("out", b)
                for i, off in zip(b.members, b.offsets):
                    v = self._views[i]
                    _write(v, b.buf[off:off + self._sizes[i]].reshape(v.shape))
                if trace is not None:
                    trace("back", b)
                if b.flags >= 0 and any(self._made[i] for i in b.members):
                    had = b.buf[b.flags:b.flags + len(b.members)].tolist()
                    none = 1 if self.op in _NONE_IS_ONE else 0
                    unused += [i for k, i in enumerate(b.members)
                               if self._made[i] and had[k] == none]
        if self.params is None:
            return
        stale = [i for i, p in enumerate(self.params) if p.grad is not self._held[i]]
        for i in unused:     # no rank had a gradient: None again, as DDP leaves it
            if self.params[i].grad is self._held[i]:
                self.params[i].grad = None
        if self.torch:
            self._left = [(id(p.grad), p.grad._version) if p.grad is not None else (0, -1)
                          for p in self.params]
        for i in range(len(self.params)):    # keep no tensor torch may drop before the next step
            self.grads[i] = self._views[i] = self._held[i] = None
        if stale or written:
            i = (stale or written)[0]
            how = "replaced" if stale else "written"
            raise RuntimeError(f"{self._me}: gradient {i} was {how} after its bucket took "
                               f"it: parameter {i}'s .grad changed between its bucket's "
                               f"launch and wait() (zero_grad() or another backward in "
                               f"between? accumulate with ready() held back until the last "
                               f"micro-batch, as DDP's no_sync; a hook that calls ready() "
                               f"must be register_post_accumulate_grad_hook's, not "
                               f"register_hook's, which runs before the gradient is "
                               f"accumulated), so it holds no average "
                               f"({how}: {(stale or written)[:8]})")


class _Raise:
    """A bucket's call given up before it was made (GradReducer._fail_from)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def wait(self) -> None:
        raise self.error


def _write(v: Any, src: Any) -> None:
    """``v[...] = src``. A torch tensor expanded along a dimension (stride 0:
    ``p.grad = g.expand_as(p)``) takes it through its first index there
    (torch refuses to write into one; the reduced values along it are equal,
    as the gradients' were on every rank)."""
    if tensors.is_tensor(v) and any(st == 0 and n > 1 for st, n in zip(v.stride(), v.shape)):
        at = tuple(slice(0, 1) if st == 0 else slice(None) for st in v.stride())
        v, src = v[at], src[at]
    v[...] = src


def _floating(dt: Any) -> bool:
    """A numpy or torch floating or complex dtype (a bucket that can carry
    its flags)."""
    return bool(getattr(dt, "is_floating_point", False) or getattr(dt, "is_complex", False)) \
        or (isinstance(dt, np.dtype) and dt.kind in "fc")


# What a parameter without a .grad contributes: the op's identity (avg and sum: zeros).
_IDENTITY = {"max": -float("inf"), "min": float("inf"), "prod": 1.0}
# The ops whose flags say "had none": 1 where a rank had no gradient, 0 where it had one
# (min and prod of them are 1 where no rank had one); the others' say "had one" (max,
# sum and average are 0 where no rank had one).
_NONE_IS_ONE = ("min", "prod")


def _torch() -> Any:
    import torch     # only ever called once a tensor was seen
    return torch


class _Once(GradReducer):
    """all_reduce_grads' reducer: used at once, so torch gradients are current."""
    _refuse_torch = False
    _called = "all_reduce_grads"


def all_reduce_grads(g: Comm, grads: Iterable[Any], bucket_bytes: int =
                     DEFAULT_BUCKET_BYTES, op: str | Op = "avg",
                     timeout: float | None = None) -> None:
    """All gradients (arrays, torch gradients too, or parameters' .grad) at
    once through fusion buckets (no overlap with backward; build a
    GradReducer and call ``ready`` for that); ``op``: as GradReducer's."""
    _Once(g, grads, bucket_bytes, op, timeout).wait()
